"""python -m jaxsora.scaling run|fit|samples: train a sweep, fit its frontier, show its samples.

    python -m jaxsora.scaling run --sweep experiments/scaling_cpu.py --out runs/scaling
    python -m jaxsora.scaling fit runs/scaling       # scaling.png, scaling.json
    python -m jaxsora.scaling samples runs/scaling   # samples.png

`run` trains every unfinished run (rerun it after an interruption: finished runs are skipped,
the interrupted one resumes from its checkpoint); `--only NAME[,NAME]` trains those runs alone
(spread a sweep over machines that share --out); `--list` prints the plan and exits.
`fit` prints the fit's headline numbers as one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from absl import logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxsora.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train the sweep's unfinished runs")
    r.add_argument("--sweep", required=True, help="sweep file, path[:arg]")
    r.add_argument("--out", required=True, help="sweep folder (runs/, plan.json)")
    r.add_argument("--data_dir", default="data/tfds")
    r.add_argument("--only", default="", help="comma-separated run names")
    r.add_argument("--list", action="store_true", help="print the plan and exit")
    f = sub.add_parser("fit", help="fit the frontier; write scaling.png and scaling.json")
    f.add_argument("out")
    s = sub.add_parser("samples", help="write samples.png: the same prompts at each compute")
    s.add_argument("out")
    s.add_argument("--columns", type=int, default=6)
    args = p.parse_args(argv)
    logging.set_verbosity(logging.INFO)
    logging.use_absl_handler()

    from jaxsora.scaling import figures, fit, sweep

    try:
        if args.command == "run":
            if args.list:
                for plan in sweep.plan(sweep.load_sweep(args.sweep), args.data_dir):
                    print(json.dumps({k: v for k, v in dataclasses.asdict(plan).items()
                                      if k != "fields"}))  # fmt: skip
                return 0
            only = [n for n in args.only.split(",") if n]
            done = sweep.run(args.sweep, args.out, args.data_dir, only or None)
            print(json.dumps({"finished": [d["name"] for d in done]}))
        elif args.command == "fit":
            finished = sweep.results(args.out)
            curves = sweep.curves(args.out, finished)
            summary = fit.summarize(finished, curves)
            with open(os.path.join(args.out, "scaling.json"), "w") as fh:
                json.dump(summary, fh, indent=1)
            figures.scaling_png(os.path.join(args.out, "scaling.png"), finished, curves, summary)
            head = {k: summary[k] for k in ("a", "b", "c", "C0", "ci95")}
            head["n_opt_alpha"] = summary["n_opt"].get("alpha")
            head["best_at_budget"] = [b["run"] for b in summary["best_at_budget"]]
            print(json.dumps(head))
        else:
            labels = figures.samples_png(
                args.out, os.path.join(args.out, "samples.png"), args.columns
            )
            print(json.dumps({"samples": os.path.join(args.out, "samples.png"), "rows": labels}))
    except (ValueError, FileNotFoundError, sweep.RunFailed, sweep.SweepInterrupted) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError | FileNotFoundError) else 1
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
