"""The Apache Beam side of `data_pipelines.engine`: imported only by builds that run on Beam,
so the single-process path never needs `apache_beam`."""

from __future__ import annotations

import collections
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

from data_pipelines import engine


class _RunUnit(beam.DoFn):
    def __init__(self, split: str, processor: engine.Processor):
        self._split = split
        self._processor = processor

    def setup(self) -> None:
        self._processor.setup()

    def process(self, unit: Any):
        for item in self._processor(unit):
            if isinstance(item, engine.Skip):
                Metrics.counter(
                    engine.METRICS_NAMESPACE, engine.counter_name(self._split, item.reason)
                ).inc()
                engine._log_skip(self._split, item)
            elif isinstance(item, engine.Tally):
                Metrics.counter(
                    engine.METRICS_NAMESPACE, engine.counter_name(self._split, item.name)
                ).inc(item.n)
            elif isinstance(item, engine.Peak):
                Metrics.distribution(
                    engine.METRICS_NAMESPACE, engine.counter_name(self._split, item.name)
                ).update(item.value)
            else:
                Metrics.counter(
                    engine.METRICS_NAMESPACE, engine.counter_name(self._split, engine.WRITTEN)
                ).inc()
                yield item


def transform(split: str, units: list[Any], processor: engine.Processor) -> beam.PTransform:
    """Create(units) | ParDo(processor). Reshuffle spreads the units over the workers (a
    Create's elements would otherwise stay in one bundle on some runners)."""
    return (
        f"Units {split}" >> beam.Create(units)
        | f"Spread {split}" >> beam.Reshuffle()
        | f"Process {split}" >> beam.ParDo(_RunUnit(split, processor))
    )


def split_counts(pipeline_result) -> dict[str, collections.Counter]:
    """The pipeline's `jaxsora` counters (summed) and distributions (their max) as
    {split: Counter(what -> n)}."""
    query = pipeline_result.metrics().query(
        MetricsFilter().with_namespace(engine.METRICS_NAMESPACE)
    )
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for counter in query["counters"]:
        split, _, what = counter.key.metric.name.partition("/")
        value = counter.committed if counter.committed is not None else counter.attempted
        out[split][what] += int(value or 0)
    for dist in query["distributions"]:
        split, _, what = dist.key.metric.name.partition("/")
        value = dist.committed if dist.committed is not None else dist.attempted
        if value is not None and value.count:
            out[split][what] = max(out[split].get(what, value.max), int(value.max))
    return dict(out)
