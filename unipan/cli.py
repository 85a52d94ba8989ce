"""The `unipan` command.

Thin: each verb parses its arguments and calls the library function that the tests call too.

Start-up is part of what a user waits for, so imports follow the verb: `unipan --help` builds a
parser that names the verbs without importing any of their modules; only the chosen verb's
arguments (and modules) are loaded. The light verbs (`pq`, `viz`, `data synth`) never import torch
(importing it costs seconds on a small machine). The heavy verbs set torch's thread defaults in the
environment before torch is first imported (`unipan.threads`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("unipan")


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


# --- data ------------------------------------------------------------------------------------
def _add_data(p: argparse.ArgumentParser) -> None:
    from unipan.data.synthetic import add_synth_arguments, synth_main

    dsub = p.add_subparsers(dest="data_verb", required=True)
    s = dsub.add_parser("synth", help="write the synthetic panoptic dataset in COCO-panoptic format")
    add_synth_arguments(s)
    s.set_defaults(func=synth_main)


# --- pq --------------------------------------------------------------------------------------
def _add_pq(p: argparse.ArgumentParser) -> None:
    from unipan.evaluation.pq import add_pq_arguments, run_pq

    add_pq_arguments(p)
    p.set_defaults(func=run_pq)


# --- viz -------------------------------------------------------------------------------------
def _add_viz(p: argparse.ArgumentParser) -> None:
    from unipan.viz import add_viz_arguments, viz_main

    add_viz_arguments(p)
    p.set_defaults(func=viz_main)


# --- train / eval / predict / demo -----------------------------------------------------------
def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="YAML config, e.g. configs/panoptic_fpn/tiny_synth.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. solver.lr=0.01")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    p.set_defaults(func=_train_main)


def _train_main(args: argparse.Namespace) -> int:
    from unipan.config import load_config
    from unipan.engine.trainer import train

    cfg = load_config(_existing(args.config), args.overrides)
    result = train(cfg, resume=args.resume)
    print(f"finished: checkpoint {result.checkpoint}")
    return 0


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="YAML config the model was trained with")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.val_json=...")
    p.add_argument("--weights", required=True, type=Path, help="checkpoint (.pth) to evaluate")
    p.add_argument("--out", type=Path, default=None, help="write COCO-panoptic predictions and pq.json here")
    p.set_defaults(func=_eval_main)


def _eval_main(args: argparse.Namespace) -> int:
    from unipan.app import evaluate_checkpoint

    evaluate_checkpoint(_existing(args.config), args.overrides, _existing(args.weights), args.out)
    return 0


def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", type=Path, help="image files or folders of images")
    p.add_argument("--weights", required=True, type=Path, help="checkpoint (.pth)")
    p.add_argument("--out", required=True, type=Path, help="output folder (PNG + JSON + overlays)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    p.set_defaults(func=_predict_main)


def _predict_main(args: argparse.Namespace) -> int:
    from unipan.app import predict_images

    predict_images(_existing(args.weights), args.inputs, args.out, device=args.device)
    return 0


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--model", default="panoptic_fpn", help="model to train (default panoptic_fpn)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the tiny config, e.g. solver.max_iter=100")
    p.set_defaults(func=_demo_main)


def _demo_main(args: argparse.Namespace) -> int:
    from unipan.app import run_demo

    run_demo(args.out, model=args.model, overrides=args.overrides)
    return 0


def _existing(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    return path


@dataclass(frozen=True)
class Verb:
    """One verb of the command: its name, its one-line help and what adds its arguments.

    Attributes:
        name: the verb as typed.
        help: one line for `unipan --help`.
        add_arguments: adds the verb's arguments (and `func`) to its parser; it may import the
            verb's modules, so it runs only for the verb being parsed.
        heavy: the verb uses torch (its thread defaults are set before torch is imported).
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    heavy: bool = False


VERBS: list[Verb] = [
    Verb("data", "dataset tools", _add_data),
    Verb("pq", "PQ/SQ/RQ of COCO-panoptic predictions against ground truth (as panopticapi pq_compute)", _add_pq),
    Verb("viz", "draw panoptic segmentations of a COCO-panoptic folder over their images", _add_viz),
    Verb("train", "train a model from a YAML config", _add_train, heavy=True),
    Verb("eval", "evaluate a checkpoint on the config's validation split", _add_eval, heavy=True),
    Verb("predict", "panoptic segmentation of your own images", _add_predict, heavy=True),
    Verb(
        "demo", "synthetic data -> train a tiny model on CPU -> evaluate -> pictures and report", _add_demo, heavy=True
    ),
]


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The command's parser.

    Args:
        verb: fill in only this verb's arguments (the others are listed with their help but take
            no arguments), so that parsing imports only its modules; None fills in every verb.
    """
    parser = argparse.ArgumentParser(
        prog="unipan",
        description="unipan: unified panoptic segmentation (Panoptic FPN, UPSNet, ...): data, training, "
        "evaluation (PQ as panopticapi), prediction and pictures.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", required=True)
    for v in VERBS:
        p = sub.add_parser(v.name, help=v.help, description=v.help)
        if verb is None or verb == v.name:
            v.add_arguments(p)
    return parser


def _verb_of(argv: Sequence[str]) -> str | None:
    """The verb named on a command line: the first word that is not a top-level option."""
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = _verb_of(argv)
    if any(v.heavy and v.name == verb for v in VERBS):
        from unipan.threads import configure_threads

        configure_threads()  # before anything imports torch
    parser = build_parser(verb if any(v.name == verb for v in VERBS) else "")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError, KeyError) as e:
        # Bad input: one line naming the file/image and the problem, no traceback.
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"unipan {args.verb}: error: {msg}", file=sys.stderr)
        if args.verbose:
            raise
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
