"""The `faceveil` command line: a thin absl layer over the library functions.

    faceveil fetch-weights [--models=mtcnn,dlib_resnet,...] [--force]
    faceveil detect --input IMAGE_OR_VIDEO [--output annotated.png|.mp4] [--json faces.json]
    faceveil compare IMAGE_A IMAGE_B [--model dlib|facenet]
    faceveil demo [--out DIR]

Every command exits 0 on success, 1 on a user error (bad input, missing weights) with a
one-line message on stderr that names the file and the reason, and leaves inputs untouched.
"""

from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS

flags.DEFINE_list("models", None, "fetch-weights: models to fetch (default: all).")
flags.DEFINE_bool("force", False, "fetch-weights: convert again even if the store is valid.")
flags.DEFINE_string("input", None, "detect: image or video to read.")
flags.DEFINE_string("output", None, "detect: annotated image (.png/.jpg) or video (.mp4).")
flags.DEFINE_string("json", None, "detect: where to write boxes and landmarks as JSON.")
flags.DEFINE_string("model", "dlib", "compare: recogniser (dlib or facenet).")
flags.DEFINE_string("out", "out/demo", "demo: output folder.")
flags.DEFINE_float("min_score", 0.9, "detect: report faces whose O-Net score is at least this.")
flags.DEFINE_bool("overwrite", False, "Allow an output path that names an input file.")

COMMANDS = ("fetch-weights", "detect", "compare", "demo")


class UserError(Exception):
    """A problem with the user's input or set-up; the message is shown as is."""


def _cmd_fetch_weights(args):
    from faceveil.models import store

    del args
    store.fetch(FLAGS.models, force=FLAGS.force)


def _cmd_detect(args):
    from faceveil.engine import detect_cli

    if args:
        raise UserError(f"detect takes no positional arguments (got {args}); use --input")
    if not FLAGS.input:
        raise UserError("detect needs --input IMAGE_OR_VIDEO")
    detect_cli.run(FLAGS.input, output=FLAGS.output, json_path=FLAGS.json,
                   min_score=FLAGS.min_score, overwrite=FLAGS.overwrite)


def _cmd_compare(args):
    from faceveil.engine import compare

    if len(args) != 2:
        raise UserError("compare needs exactly two images: faceveil compare IMAGE_A IMAGE_B")
    result = compare.compare_files(args[0], args[1], model=FLAGS.model)
    print(compare.format_result(result))


def _cmd_demo(args):
    from faceveil.engine import demo

    del args
    demo.run(FLAGS.out)


_HANDLERS = {
    "fetch-weights": _cmd_fetch_weights,
    "detect": _cmd_detect,
    "compare": _cmd_compare,
    "demo": _cmd_demo,
}


def _main(argv):
    command, args = argv[1], argv[2:]
    from faceveil.engine.image_io import InputError
    from faceveil.models.store import StoreError

    try:
        _HANDLERS[command](args)
    except (UserError, InputError, StoreError, FileNotFoundError, PermissionError) as e:
        print(f"faceveil {command}: error: {e}", file=sys.stderr)
        sys.exit(1)


def run(argv=None):
    """Runs the command named by argv[1] (entry point of the `faceveil` script)."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "--helpshort", "help"):
        print(__doc__)
        sys.exit(0)
    command = argv[1]
    if command not in _HANDLERS:
        print(f"faceveil: unknown command '{command}'; commands: {', '.join(COMMANDS)}",
              file=sys.stderr)
        sys.exit(2)
    # absl parses the flags after the command; the command itself is passed through.
    app.run(_main, argv=[argv[0], command] + argv[2:])


if __name__ == "__main__":
    run()
