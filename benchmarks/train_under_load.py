"""Training step time of the tiny Panoptic FPN on a quiet machine and beside a competing process.

torch's OpenMP threads spin while they wait for work, so beside another CPU-bound process a step
can cost many times its quiet time. This measures, for each thread policy, in one run:

- quiet: the step alone;
- beside a busy loop: with one single-threaded `while True: pass` process running;
- beside a second training: with a second process training the same model, with the same policy
  (two `unipan train` runs side by side).

and prints the ratios behind the targets: beside one competing process a step costs at most 2.5x
its quiet time, and the chosen policy's quiet step at most 5% more than today's.

Policies: `today` (torch's defaults: no OpenMP variables, the config's `engine.num_threads`),
`unipan` (what the `unipan` command sets, `unipan.threads.DEFAULT_THREAD_ENV`), `passive`
(OMP_WAIT_POLICY=PASSIVE), `spin=N` (GOMP_SPINCOUNT=N), `threads=N` (torch.set_num_threads(N)
and no OpenMP variables). Each measurement is a fresh process, because libgomp reads its
environment once, when torch is imported. The step is forward + backward + SGD step on one fixed
batch of 8 synthetic 128x128 images (the data loading of a real run left out).

    python benchmarks/train_under_load.py
    python benchmarks/train_under_load.py --policies today unipan threads=1 spin=10000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "unipan" / "configs" / "panoptic_fpn" / "tiny_synth.yaml"
OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_BLOCKTIME")
BUSY_LOOP = "while True:\n    pass\n"


def policy_setup(policy: str) -> tuple[dict[str, str], int | None]:
    """(environment variables, torch threads or None for the config's) of a policy name."""
    if policy == "today":
        return {}, None
    if policy == "unipan":
        sys.path.insert(0, str(ROOT))
        from unipan.threads import DEFAULT_THREAD_ENV

        return dict(DEFAULT_THREAD_ENV), None
    if policy == "passive":
        return {"OMP_WAIT_POLICY": "PASSIVE"}, None
    if policy.startswith("spin="):
        return {"GOMP_SPINCOUNT": policy.split("=", 1)[1]}, None
    if policy.startswith("threads="):
        return {}, int(policy.split("=", 1)[1])
    raise SystemExit(f"unknown policy {policy!r}: today | unipan | passive | spin=N | threads=N")


def _child_env(policy: str) -> tuple[dict[str, str], int | None]:
    variables, threads = policy_setup(policy)
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}
    env.update(variables)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env, threads


# --- the child: build the model, step on one batch --------------------------------------------
def run_child(args: argparse.Namespace) -> int:
    import torch

    from unipan.config import load_config
    from unipan.data.collate import collate
    from unipan.data.synthetic import SyntheticPanoptic, SynthOptions
    from unipan.engine.schedule import build_optimizer
    from unipan.modeling.meta_arch import model_size_divisibility
    from unipan.modeling.registry import build_model

    cfg = load_config(CONFIG)
    threads = args.threads if args.threads is not None else cfg.engine.num_threads
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = SyntheticPanoptic(cfg.solver.batch_size, seed=0, opts=SynthOptions(size=(128, 128)))
    model = build_model(cfg, data.meta)
    model.train()
    batch = collate([data[i] for i in range(len(data))], model_size_divisibility(model))
    optimizer = build_optimizer(cfg.solver, model)

    def step() -> float:
        start = time.perf_counter()
        losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.solver.clip_grad_norm)
        optimizer.step()
        return time.perf_counter() - start

    step()  # first step: allocations, lazy initialisation
    print("ready", flush=True)
    if args.forever:
        while True:
            step()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < args.steps and (len(times) < 2 or time.perf_counter() - start < args.max_seconds):
        times.append(step())
    print(json.dumps({"median": statistics.median(times), "times": times, "threads": torch.get_num_threads()}))
    return 0


# --- the parent: one fresh process per measurement ---------------------------------------------
def _child_cmd(args: argparse.Namespace, threads: int | None, forever: bool) -> list[str]:
    cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps), "--max-seconds", str(args.max_seconds)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    return cmd + (["--forever"] if forever else [])


def measure(args: argparse.Namespace, policy: str, load: str) -> dict[str, Any]:
    """Median step seconds of `policy` with `load` in {"quiet", "busy loop", "training"} beside it."""
    env, threads = _child_env(policy)
    competitor: subprocess.Popen[str] | None = None
    try:
        if load == "busy loop":
            competitor = subprocess.Popen([sys.executable, "-c", BUSY_LOOP], text=True)
        elif load == "training":
            competitor = subprocess.Popen(
                _child_cmd(args, threads, forever=True), env=env, stdout=subprocess.PIPE, text=True
            )
            assert competitor.stdout is not None
            if competitor.stdout.readline().strip() != "ready":  # wait until it is stepping
                raise RuntimeError("the competing training did not start")
        out = subprocess.run(_child_cmd(args, threads, forever=False), env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{policy}/{load}: child failed:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", nargs="+", default=["today", "unipan"], help="default: today unipan")
    parser.add_argument("--loads", nargs="+", default=["quiet", "busy loop", "training"])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement (default 8)")
    parser.add_argument("--max-seconds", type=float, default=40.0, help="stop a measurement after this (min 2 steps)")
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--forever", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args)

    print(f"load before: {os.getloadavg()[0]:.2f} (1-minute average); cpu count {os.cpu_count()}", flush=True)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    print(f"  {'policy':16s} {'load':10s} {'median s/step':>13s}  steps")
    for policy in args.policies:
        results[policy] = {}
        for load in args.loads:
            r = measure(args, policy, load)
            results[policy][load] = r
            shown = " ".join(f"{t:.2f}" for t in r["times"])
            print(f"  {policy:16s} {load:10s} {r['median']:13.3f}  [{shown}] ({r['threads']} threads)", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")

    print("\nratios (targets in brackets):")
    ok = True
    for policy, by_load in results.items():
        quiet = by_load.get("quiet")
        if quiet is None:
            continue
        for load in ("busy loop", "training"):
            if load in by_load:
                r = by_load[load]["median"] / quiet["median"]
                verdict = "met" if r <= 2.5 else "NOT MET"
                ok &= r <= 2.5 or policy == "today"
                print(f"  {policy:16s} beside a {load:10s} / quiet {r:7.2f}  [<= 2.5]  {verdict}")
    if "today" in results and "quiet" in results["today"]:
        base = results["today"]["quiet"]["median"]
        for policy, by_load in results.items():
            if policy != "today" and "quiet" in by_load:
                r = by_load["quiet"]["median"] / base
                verdict = "met" if r <= 1.05 else "NOT MET"
                ok &= r <= 1.05 or policy != "unipan"
                print(f"  {policy:16s} quiet / today quiet             {r:7.2f}  [<= 1.05] {verdict}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
