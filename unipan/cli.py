"""The `unipan` command.

Thin: each verb parses its arguments and calls the library function that the tests call too.

Start-up is part of what a user waits for, so imports follow the verb: `unipan --help` builds a
parser that names the verbs without importing any of their modules; only the chosen verb's
arguments (and modules) are loaded. The light verbs (`pq`, `viz`, `data synth`) never import torch
(importing it costs seconds on a small machine). The heavy verbs set torch's thread defaults in the
environment before torch is first imported (`unipan.threads`).

Two conventions hold for every verb:

- Dotted overrides (`solver.lr=0.01`, `data.min_size_test=64`) may stand anywhere on the line of
  a verb that takes them: a word of the form `dotted.key=value` that names no existing file is an
  override, everything else is an option or a positional argument (`split_overrides`).
- Every fault a user can cause or meet (bad input, a damaged file, a full or read-only disk, a
  non-finite loss, Ctrl-C) ends in one line on stderr, `unipan VERB: error: ...`, and a non-zero
  exit status; `main` is the one place that turns exceptions into that line (`error_line`), and
  `--verbose` shows the traceback too. Output folders are checked before any work starts.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
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
_RESTART_HELP = (
    "start over in a folder that holds a run: the old run's files are moved aside to <folder>.old-<time>, never deleted"
)


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config: a file, or a shipped config by name, e.g. panoptic_fpn/tiny_synth")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. solver.lr=0.01")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in output_dir")
    mode.add_argument("--restart", action="store_true", help=_RESTART_HELP)
    p.set_defaults(func=_train_main)


def _train_main(args: argparse.Namespace) -> int:
    from unipan.app import resolve_config_path
    from unipan.config import load_config
    from unipan.engine.trainer import train

    cfg = load_config(resolve_config_path(args.config), args.overrides)
    result = train(cfg, resume=args.resume, restart=args.restart)
    print(f"finished: checkpoint {result.checkpoint}")
    return 0


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config the model was trained with (a file or a shipped config's name)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.val_json=...")
    p.add_argument("--weights", required=True, type=Path, help="checkpoint (.pth) to evaluate")
    p.add_argument("--out", type=Path, default=None, help="write COCO-panoptic predictions and pq.json here")
    p.set_defaults(func=_eval_main)


def _eval_main(args: argparse.Namespace) -> int:
    from unipan.app import evaluate_checkpoint, resolve_config_path

    evaluate_checkpoint(resolve_config_path(args.config), args.overrides, _existing(args.weights), args.out)
    return 0


def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", type=Path, help="image files or folders of images")
    p.add_argument("--weights", required=True, type=Path, help="checkpoint (.pth)")
    p.add_argument("--out", required=True, type=Path, help="output folder (PNG + JSON + overlays)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    p.add_argument(
        "--images-json",
        type=Path,
        default=None,
        help="COCO image-info JSON (e.g. image_info_test-dev2017.json or a panoptic JSON): predict its images, "
        "found by file name in the inputs, under its image ids and file names, so `unipan pq` can score them",
    )
    p.set_defaults(func=_predict_main, overrides=[])


def _predict_main(args: argparse.Namespace) -> int:
    from unipan.app import predict_images

    result = predict_images(
        _existing(args.weights),
        args.inputs,
        args.out,
        device=args.device,
        overrides=args.overrides,
        images_json=None if args.images_json is None else _existing(args.images_json),
    )
    for failure in result.failed:
        print(f"unipan predict: {failure}", file=sys.stderr)
    if result.failed:
        print(
            f"unipan predict: error: {len(result.failed)} of {result.total} images failed (listed above); "
            f"{result.total - len(result.failed)} predicted",
            file=sys.stderr,
        )
        return 1
    return 0


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--model", default="panoptic_fpn", help="model to train (default panoptic_fpn)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides of the tiny config, e.g. solver.max_iter=100",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the demo's training run in OUT/run")
    mode.add_argument("--restart", action="store_true", help=_RESTART_HELP)
    p.set_defaults(func=_demo_main)


def _demo_main(args: argparse.Namespace) -> int:
    from unipan.app import run_demo

    run_demo(args.out, model=args.model, overrides=args.overrides, resume=args.resume, restart=args.restart)
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
        overrides: the verb takes dotted `key=value` overrides anywhere on its line (`args.overrides`).
        output_folders: arguments naming folders the verb writes: created and checked writable
            before the verb starts.
        output_files: arguments naming files the verb writes: their folders are checked so.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    heavy: bool = False
    overrides: bool = False
    output_folders: tuple[str, ...] = ()
    output_files: tuple[str, ...] = ()


VERBS: list[Verb] = [
    Verb("data", "dataset tools", _add_data, output_folders=("out",)),
    Verb(
        "pq",
        "PQ/SQ/RQ of COCO-panoptic predictions against ground truth (as panopticapi pq_compute)",
        _add_pq,
        output_files=("json",),
    ),
    Verb(
        "viz",
        "draw panoptic segmentations of a COCO-panoptic folder over their images",
        _add_viz,
        output_folders=("out",),
    ),
    Verb("train", "train a model from a YAML config", _add_train, heavy=True, overrides=True),
    Verb(
        "eval",
        "evaluate a checkpoint on the config's validation split",
        _add_eval,
        heavy=True,
        overrides=True,
        output_folders=("out",),
    ),
    Verb(
        "predict",
        "panoptic segmentation of your own images",
        _add_predict,
        heavy=True,
        overrides=True,
        output_folders=("out",),
    ),
    Verb(
        "demo",
        "synthetic data -> train a tiny model on CPU -> evaluate -> pictures and report",
        _add_demo,
        heavy=True,
        overrides=True,
        output_folders=("out",),
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


_OVERRIDE_RE = re.compile(r"^[A-Za-z_]\w*(?:\.\w+)+=")


def split_overrides(argv: Sequence[str], value_options: set[str]) -> tuple[list[str], list[str]]:
    """(the other words, the overrides) of a verb's command line, each in their order.

    A word is an override when it reads `dotted.key=value`, names no existing file or folder,
    and is not the value of an option that takes one (`--out a.b=c` keeps its folder).
    """
    rest: list[str] = []
    overrides: list[str] = []
    for i, word in enumerate(argv):
        is_value = i > 0 and argv[i - 1] in value_options
        if not is_value and _OVERRIDE_RE.match(word) and not Path(word).exists():
            overrides.append(word)
        else:
            rest.append(word)
    return rest, overrides


def _value_options(parser: argparse.ArgumentParser) -> set[str]:
    # argparse has no public listing of a parser's options; `_actions` has been stable for decades
    return {opt for action in parser._actions if action.nargs != 0 for opt in action.option_strings}


def _verb_parser(parser: argparse.ArgumentParser, verb: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[verb]
    raise KeyError(verb)  # pragma: no cover - build_parser always adds the verbs


def check_outputs(spec: Verb, args: argparse.Namespace) -> None:
    """Create the verb's output folders and check they are writable, before any work starts."""
    from unipan.files import check_writable_folder

    for name in spec.output_folders:
        value = getattr(args, name, None)
        if value is not None:
            check_writable_folder(value, f"output folder (--{name})")
    for name in spec.output_files:
        value = getattr(args, name, None)
        if value is not None:
            check_writable_folder(Path(value).parent, f"folder of --{name}")


def error_line(e: BaseException) -> str:
    """The one line that tells the user what went wrong (no traceback, no advice meant for developers)."""
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, OSError) and e.filename is not None:
        if e.errno == errno.ENOSPC:
            return f"no space left on device writing {e.filename}"
        reason = e.strerror or str(e)
        return f"{e.filename}: {reason[:1].lower()}{reason[1:]}"
    text = str(e).strip() or type(e).__name__
    # some libraries' messages run over several lines: keep them on one
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


# What `main` reports in one line: input errors, damaged files, the file system, a diverging loss.
# Anything else (a TypeError, an AssertionError, ...) is a bug and keeps its traceback.
_REPORTED = (UserError, ValueError, KeyError, OSError, FloatingPointError)


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
    spec = next((v for v in VERBS if v.name == verb), None)
    parser = build_parser(verb if spec is not None else "")
    overrides: list[str] = []
    if spec is not None and spec.overrides:
        takes_value = _value_options(parser) | _value_options(_verb_parser(parser, spec.name))
        argv, overrides = split_overrides(argv, takes_value)
    args = parser.parse_args(argv)
    if spec is not None and spec.overrides:
        # words argparse kept as positional overrides (not key=value) go along, to be named as bad
        args.overrides = [*getattr(args, "overrides", []), *overrides]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    name = " ".join(w for w in (args.verb, getattr(args, "data_verb", None)) if w)
    try:
        if spec is not None:
            check_outputs(spec, args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        # the trainer's interruption names the iteration and the checkpoint --resume continues from
        print(f"unipan {name}: {error_line(e) if str(e) else 'interrupted'}", file=sys.stderr)
        if args.verbose:
            raise
        return 130
    except BrokenPipeError:
        # the reader went away (`unipan pq ... | head`): nothing more to say, and nowhere to say it
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout at exit
        return 141
    except _REPORTED as e:
        print(f"unipan {name}: error: {error_line(e)}", file=sys.stderr)
        if args.verbose:
            raise
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
