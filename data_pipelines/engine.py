"""One build, two engines: a builder's split as a list of work units, run in this process or on
Apache Beam, writing the same records either way.

Why: a folder of a few hundred clips builds in seconds in one Python process, while a bucket
of millions needs the distributed engine its owner already runs (Dataflow, Flink, Spark). Both
must give the same dataset, so both run the same code: a builder describes a split as
picklable `units` (e.g. runs of source record indices) and a `Processor` that turns one unit
into `(key, example)` pairs and `Skip`s. `EngineBuilder._generate_examples` then

  * without Beam options (`tfds.download.DownloadConfig(beam_options=None)`, the default):
    runs the units here, in order, as a generator (TFDS's plain writer);
  * with them: returns a Beam PTransform, `Create(units) | ParDo(processor)` (TFDS's
    `BeamWriter`), each worker calling the processor's `setup` once (load a VAE, a text
    encoder) and then units as the runner hands them out.

The keys are the processor's, so the records and their order are the same on both engines
(TFDS sorts by key when a builder disables shuffling). A `Skip` (a corrupt file, an
undecodable source record) is logged and counted by reason, never fatal; the processor may
also `Tally` what it did (e.g. bytes stored) and keep a `Peak` (e.g. the largest error).
Counts come back per split: from a local `Counter`, or from Beam's metrics after the pipeline;
the builder's `record_counts` hook gets them before TFDS writes the dataset's info, so they
land in its metadata on both engines.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds
from absl import logging

METRICS_NAMESPACE = "jaxsora"
WRITTEN = "written"  # the count every split gets: records written


@dataclasses.dataclass(frozen=True)
class Skip:
    """An input left out: counted under `reason`, logged with `detail` (the file, the error)."""

    reason: str
    detail: str


@dataclasses.dataclass(frozen=True)
class Tally:
    """`n` more of something the processor counts (`name`), with no record attached."""

    name: str
    n: int = 1


@dataclasses.dataclass(frozen=True)
class Peak:
    """A value whose maximum over the split is kept under `name` (an int: Beam's
    distributions are integer; scale fractions, e.g. by `FIXED_POINT`)."""

    name: str
    value: int


FIXED_POINT = 2**30  # float statistics as integers (units of 2**-30), for Tally and Peak


class Processor(abc.ABC):
    """Turns one work unit into `(key, example)` pairs, `Skip`s and `Tally`s. Picklable: Beam
    ships it to every worker, so hold paths and settings, and load heavy things in `setup`."""

    def setup(self) -> None:  # noqa: B027  (optional: most processors load something here)
        """Called once per process before the first unit (a Beam worker's DoFn.setup)."""

    @abc.abstractmethod
    def __call__(self, unit: Any) -> Iterator[tuple[Any, dict[str, Any]] | Skip | Tally | Peak]:
        """The unit's records, skips, tallies and peaks, in key order."""


def chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    """`items` in runs of `size`: units small enough to spread over many workers, big enough
    that per-unit overhead (a Beam bundle, a batch) stays small."""
    return [list(items[i : i + size]) for i in range(0, len(items), max(1, size))]


def counter_name(split: str, what: str) -> str:
    return f"{split}/{what}"


def _log_skip(split: str, skip: Skip) -> None:
    logging.warning("%s: skipped (%s): %s", split, skip.reason, skip.detail)


class EngineBuilder(tfds.core.GeneratorBasedBuilder):
    """A GeneratorBasedBuilder whose splits run as work units on either engine: its
    `_split_generators` returns `self._generate_examples(split, units, processor)` per split."""

    def _generate_splits(self, dl_manager, download_config):
        # TFDS creates a Beam pipeline when the download config has Beam options or a runner;
        # the splits' generators must then be PTransforms, so decide here, before
        # `_split_generators` builds them.
        self._on_beam = (
            download_config.beam_options is not None or download_config.beam_runner is not None
        )
        self._beam_splits = []
        return super()._generate_splits(dl_manager, download_config)

    @property
    def on_beam(self) -> bool:
        return getattr(self, "_on_beam", False)

    def _generate_examples(self, split: str, units: Iterable[Any], processor: Processor):
        """The split's examples: a generator here, a PTransform on Beam (see the module doc).
        TFDS's own hook, implemented once here for every engine builder."""
        if self.on_beam:
            from data_pipelines import engine_beam

            # Every split gets its counts, even one whose units all came to nothing (Beam
            # reports only the counters that were incremented).
            self._beam_splits.append(split)
            return engine_beam.transform(split, list(units), processor)
        return self._run_here(split, units, processor)

    def _run_here(self, split: str, units: Iterable[Any], processor: Processor):
        counts: collections.Counter = collections.Counter()
        processor.setup()
        for unit in units:
            for item in processor(unit):
                if isinstance(item, Skip):
                    counts[item.reason] += 1
                    _log_skip(split, item)
                elif isinstance(item, Tally):
                    counts[item.name] += item.n
                elif isinstance(item, Peak):
                    counts[item.name] = max(counts.get(item.name, item.value), item.value)
                else:
                    counts[WRITTEN] += 1
                    yield item
        self._counted(split, counts)

    def _process_pipeline_result(self, pipeline_result) -> None:
        from data_pipelines import engine_beam

        counts = engine_beam.split_counts(pipeline_result)
        for split in getattr(self, "_beam_splits", []):
            self._counted(split, counts.get(split, collections.Counter()))

    def _counted(self, split: str, counts: collections.Counter) -> None:
        counts = {k: int(v) for k, v in sorted(counts.items())}
        counts.setdefault(WRITTEN, 0)
        logging.info("%s/%s: %s", self.name, split, counts)
        self.record_counts(split, counts)

    def record_counts(self, split: str, counts: dict[str, int]) -> None:
        """Where the split's counts go (the builder's metadata): override. Called once per
        split, after its last record and before the dataset's info is written."""
        metadata = self.info.metadata
        if metadata is not None:
            metadata.setdefault("counts", {})[split] = counts
