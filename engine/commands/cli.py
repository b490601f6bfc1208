"""The `faceveil` command line: a thin absl layer over the library functions.

    faceveil fetch-weights [--models=mtcnn,dlib_resnet,...] [--force]
    faceveil detect --input IMAGE_OR_VIDEO [--output annotated.png|.mp4] [--json faces.json]
    faceveil compare IMAGE_A IMAGE_B [--model dlib|facenet]
    faceveil cloak IMAGES... --out DIR [--model dlib|facenet|dlib,facenet] [--mode low|mid|high]
                   [--target-pool DIR] [--field chip|patch] [--budget dssim|lpips]
    faceveil cloak-video --input IN.mp4 --output OUT.mp4 [--reuse none|copy|affine]
                   [--report report.json] [--model ...] [--mode ...] [--segment L]
                   [--field chip|patch]
    faceveil veil make --photos DIR --key alice.veil [--model dlib|facenet] [--count 10]
                   [--alpha 0.2] [--feature-set subspace|hull] [--noblock-variance] [--iters N]
    faceveil veil apply INPUTS... --key alice.veil --out DIR
    faceveil veil recover INPUTS... --key alice.veil --out DIR
                   (passphrase: --passphrase_file F, the variable named by --passphrase_env
                   [FACEVEIL_PASSPHRASE], or a prompt; never on the command line)
    faceveil mask train --faces DIR --recognisers dlib,facenet --out MODEL_DIR [--iters N]
    faceveil mask protect IMAGES... --out DIR --keys DIR [--per-image | --model MODEL_DIR]
                   [--bits b] [--recognisers dlib,facenet] [--iters N]
    faceveil mask restore IMAGES... --keys DIR --out DIR
                   (PNG outputs only; passphrase as for veil)
    faceveil pmt IMAGES... --out DIR --authorised dlib[,facenet] [--layers L]
                   [--upload image|features] [--init noise|shuffle|blur]
                   [--augment noise|affine|mix|none] [--kernel gaussian|linear|none]
                   [--kernel-size k] [--pool p] [--iters K] [--step s]
    faceveil demo [--out DIR]
    faceveil check --protected FILES_OR_DIR[,...] --references DIR [--model dlib,facenet]
                   [--png out.png] [--json out.json]
    faceveil attack KIND --original DIR_OR_FILES --protected DIR_OR_FILES [--json out.json]
                   KIND: data-abuse [--model dlib,facenet] [--kappa 0.2] [--references DIR]
                         whitebox [--model dlib] [--layers 2] [--iters 200] [--png out.png]
                         blackbox --decoder DIR [--train-faces DIR] [--iters 600] [--png]
                         attributes
                         up [--model dlib] [--sigmas 0,0.1,...] [--kappa 0.2] [--png out.png]
                         recognise [--model dlib,facenet]   (photos)
                   faceveil attack recognise --original clean.mp4 --protected cloaked.mp4
                         [--references DIR] [--frames N] [--model dlib,facenet]
                   (photo kinds: [--align original|detect])

Several hosts (one process each; cloak, pmt, mask, veil apply|recover): add
    --distributed [--coordinator_address HOST:PORT --num_processes N --process_id I]
to every host's command (unset flags: $FACEVEIL_COORDINATOR_ADDRESS, $FACEVEIL_NUM_PROCESSES,
$FACEVEIL_PROCESS_ID, else JAX's own detection; see engine/distributed.py): each process
protects its own share of the inputs and writes only their outputs. On one host the lanes of
every command run over all its devices ($FACEVEIL_DEVICES=N: the first N).

Every command exits 0 on success, 1 on a user error (bad input, missing weights) with a
one-line message on stderr that names the file and the reason, and leaves inputs untouched.
`check` exits 2 when a protected photo still matches the reference photos (not protected).
`attack` reports numbers and exits 0 whatever they say (see engine/commands/attack_cli.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS

flags.DEFINE_list("models", None, "fetch-weights: models to fetch (default: all).")
flags.DEFINE_bool("force", False, "fetch-weights: convert again even if the store is valid.")
flags.DEFINE_string("input", None, "detect: image or video to read.")
flags.DEFINE_string("output", None, "detect: annotated image (.png/.jpg) or video (.mp4).")
flags.DEFINE_string("json", None, "detect: where to write boxes and landmarks as JSON; "
                    "check/attack: where to write the verdicts / measurements as JSON.")
flags.DEFINE_string("model", "dlib", "compare/cloak-video: recogniser (dlib or facenet); "
                    "cloak/check: one or several, comma-separated (e.g. dlib,facenet: a cloak "
                    "against both at once); attack: the attacker's (data-abuse, recognise: "
                    "several, default dlib,facenet) or the authorised recogniser (up, "
                    "whitebox, blackbox: one).")
flags.DEFINE_list("protected", None, "check/attack: protected photos and/or folders of them "
                  "(attack: also PMT .features.npz files, or one cloaked video).")
flags.DEFINE_string("references", None, "check: folder of your own clean reference photos; "
                    "attack data-abuse/up: clean photos whose mean embedding centres the "
                    "cosines (default: the originals); attack recognise on a video: labelled "
                    "photos (identity folders) of the people in it.")
flags.DEFINE_string("png", None, "check: where to write the distance chart (.png); attack up: "
                    "the UP curve; attack whitebox/blackbox: the reconstructed faces.")
flags.DEFINE_list("original", None, "attack: the clean originals (photos and/or folders, "
                  "identities = parent folder names), or the clean video.")
flags.DEFINE_float("kappa", 0.2, "attack data-abuse/up: the centred-cosine threshold of a "
                   "match (PMT's Eq. 10).")
flags.DEFINE_list("sigmas", None, "attack up: the LPIPS privacy thresholds of the curve "
                  "(default 0, 0.05, ..., 0.8).")
flags.DEFINE_string("decoder", None, "attack blackbox: folder of the trained decoder "
                    "(decoder.npz; trained there when --train-faces is given and it has none).")
flags.DEFINE_string("train-faces", None, "attack blackbox: folder of clean photos to train the "
                    "decoder on (use faces other than the attacked ones).")
flags.DEFINE_enum("align", "original", ["original", "detect"],
                  "attack (photo kinds): cut the protected face with the original's landmarks "
                  "(the same face frame: methods paste faces back in place) or with the "
                  "attacker's own detection.")
flags.DEFINE_string("out", None, "cloak/demo: output folder (demo default: out/demo).")
flags.DEFINE_enum("mode", "mid", ["low", "mid", "high"], "cloak: visual budget and strength.")
flags.DEFINE_string("target-pool", None, "cloak: folder of identity folders (targeted cloak).")
flags.DEFINE_enum("field", "chip", ["patch", "chip"],
                  "cloak/cloak-video: optimise the cloak per pixel of the recogniser's aligned "
                  "chip ('chip', the default: as strong on large faces as on small) or per "
                  "frame pixel ('patch').")
flags.DEFINE_enum("budget", "dssim", ["dssim", "lpips"],
                  "cloak: the visual budget: DSSIM of the face at the photo's scale, or LPIPS "
                  "of the aligned face (the mode sets the DSSIM; the LPIPS budget is 0.01).")
flags.DEFINE_enum("reuse", "affine", ["none", "copy", "affine"],
                  "cloak-video: warm start from the previous frame's cloak.")
flags.DEFINE_string("report", None, "cloak-video: report JSON (PNGs are written beside it).")
flags.DEFINE_integer("chunk", 16, "cloak-video: frames per compiled call.")
flags.DEFINE_integer("frames", None, "cloak-video: cloak only the first N frames; attack "
                     "recognise: judge only the first N frames.")
flags.DEFINE_integer("segment", None, "cloak-video: cut tracks into chains of this many frames "
                     "that run side by side (fills a GPU when there are few faces; each "
                     "segment's first face cold-starts).")
flags.DEFINE_bool("resume", True, "cloak-video: continue an interrupted job.")
flags.DEFINE_float("min_score", 0.9, "detect: report faces whose O-Net score is at least this.")
flags.DEFINE_bool("overwrite", False, "Allow an output path that names an input file.")
flags.DEFINE_string("photos", None, "veil make: folder of the person's photos.")
flags.DEFINE_string("key", None, "veil: the person's encrypted key file.")
flags.DEFINE_integer("count", 10, "veil make: photos of the person to use.")
flags.DEFINE_float("alpha", 0.2, "veil make: weight of the face in the veiled face.")
flags.DEFINE_enum("feature-set", "subspace", ["subspace", "hull"],
                  "veil make: keep the veiled faces' features in the span (subspace) or the "
                  "convex hull of the person's features.")
flags.DEFINE_bool("block-variance", True, "veil make: the block-variance term (hides the face's "
                  "shape); --noblock-variance is the ablation.")
flags.DEFINE_integer("iters", None, "veil make: MI-FGSM iterations (default 200); mask "
                     "protect: Adam steps on each key (default 60); pmt: "
                     "iterations (default 300); attack whitebox: reconstruction iterations "
                     "(default 200); attack blackbox: decoder training steps (default 600).")
flags.DEFINE_string("authorised", "dlib", "pmt: the recogniser(s) whose shallow part is shared "
                    "(dlib, facenet, or dlib,facenet for MR-PMT).")
flags.DEFINE_integer("layers", 2, "pmt: the cut: stages 1..L are the shared shallow model; "
                     "attack whitebox/blackbox: the cut whose features are attacked.")
flags.DEFINE_enum("upload", "image", ["image", "features"],
                  "pmt: write obfuscated faces and photos (image) or shallow features (.npz).")
flags.DEFINE_enum("init", "noise", ["noise", "shuffle", "blur"], "pmt: the start of x~.")
flags.DEFINE_enum("augment", "mix", ["noise", "affine", "mix", "none"],
                  "pmt: augmentation drawn once per iteration for both sides.")
flags.DEFINE_enum("kernel", "gaussian", ["gaussian", "linear", "none"],
                  "pmt: translation-invariant smoothing of the gradient.")
flags.DEFINE_integer("kernel-size", 5, "pmt: smoothing kernel length.")
flags.DEFINE_integer("pool", 4, "pmt: matched feature maps are averaged over cells of "
                     "pool x pool (1: the full maps, which draw the face back into x~).")
flags.DEFINE_float("step", None, "pmt: sign-step size (default 4/255, decaying to a tenth).")
flags.DEFINE_bool("aggregate", True, "pmt: layer aggregation of stages 1..L (pooled).")
flags.DEFINE_string("keys", None, "mask: folder of the encrypted per-photo keys "
                    "(<stem>.mask.key).")
flags.DEFINE_bool("per-image", True, "mask protect: optimise each photo's key directly against "
                  "the recognisers (no trained generator); --model MODEL_DIR uses a trained "
                  "one instead (faceveil mask train).")
flags.DEFINE_string("faces", None, "mask train: folder of face photos to train on (any tree).")
flags.DEFINE_integer("bits", 4, "mask protect: low-order bits per pixel the key flips (1..4).")
flags.DEFINE_string("recognisers", "dlib", "mask protect: recogniser(s) the key works against "
                    "(dlib, facenet, or dlib,facenet: their templates superpose).")
flags.DEFINE_string("passphrase_env", "FACEVEIL_PASSPHRASE",
                    "veil/mask: environment variable holding the key's passphrase.")
flags.DEFINE_string("passphrase_file", None, "veil/mask: file whose first line is the passphrase.")

flags.DEFINE_bool("distributed", False, "cloak/pmt/mask/veil apply|recover: one process per "
                  "host joins a cluster (jax.distributed) and protects its share of the inputs.")
flags.DEFINE_string("coordinator_address", None, "--distributed: HOST:PORT of process 0 "
                    "(default $FACEVEIL_COORDINATOR_ADDRESS, else JAX's detection).")
flags.DEFINE_integer("num_processes", None, "--distributed: how many processes (hosts) take "
                     "part (default $FACEVEIL_NUM_PROCESSES, else JAX's detection).")
flags.DEFINE_integer("process_id", None, "--distributed: this process's index, 0.. "
                     "num_processes - 1 (default $FACEVEIL_PROCESS_ID, else JAX's detection).")

COMMANDS = ("fetch-weights", "detect", "compare", "cloak", "cloak-video", "veil", "mask", "pmt",
            "demo", "check", "attack")

# `faceveil check`: some photo is not protected (distinct from 1, a user error).
EXIT_NOT_PROTECTED = 2


class UserError(Exception):
    """A problem with the user's input or set-up; the message is shown as is."""


def _cmd_fetch_weights(args):
    from faceveil.models import store

    del args
    store.fetch(FLAGS.models, force=FLAGS.force)


def _cmd_detect(args):
    from faceveil.engine.commands import detect_cli

    if args:
        raise UserError(f"detect takes no positional arguments (got {args}); use --input")
    if not FLAGS.input:
        raise UserError("detect needs --input IMAGE_OR_VIDEO")
    detect_cli.run(FLAGS.input, output=FLAGS.output, json_path=FLAGS.json,
                   min_score=FLAGS.min_score, overwrite=FLAGS.overwrite)


def _cmd_compare(args):
    from faceveil.engine.commands import compare

    if len(args) != 2:
        raise UserError("compare needs exactly two images: faceveil compare IMAGE_A IMAGE_B")
    result = compare.compare_files(args[0], args[1], model=FLAGS.model)
    print(compare.format_result(result))


def _cmd_cloak(args):
    from faceveil.engine.commands import cloak_cli

    if not FLAGS.out:
        raise UserError("cloak needs --out DIR for the cloaked images")
    if not args:
        raise UserError("cloak needs at least one image: faceveil cloak IMAGES... --out DIR")
    args = _share("cloak", args, list)
    if not args:
        return
    cloak_cli.run_images(args, FLAGS.out, model=FLAGS.model, mode=FLAGS.mode,
                         target_pool=FLAGS["target-pool"].value, overwrite=FLAGS.overwrite,
                         field=FLAGS.field, budget=FLAGS.budget)


def _cmd_cloak_video(args):
    from faceveil.engine.commands import cloak_cli

    if args:
        raise UserError(f"cloak-video takes no positional arguments (got {args})")
    if "," in FLAGS.model:
        raise UserError(f"--model={FLAGS.model}: cloak-video works against one recogniser "
                        "(dlib or facenet); two at once is for photos (faceveil cloak)")
    if not FLAGS.input or not FLAGS.output:
        raise UserError("cloak-video needs --input IN.mp4 and --output OUT.mp4")
    cloak_cli.run_video(FLAGS.input, FLAGS.output, report_path=FLAGS.report,
                        reuse=FLAGS.reuse, model=FLAGS.model, mode=FLAGS.mode,
                        chunk=FLAGS.chunk, max_frames=FLAGS.frames, resume=FLAGS.resume,
                        overwrite=FLAGS.overwrite, segment=FLAGS.segment, field=FLAGS.field)


def _cmd_veil(args):
    from faceveil.engine.commands import veil_cli
    from faceveil.engine.methods import veil as veil_core

    actions = ("make", "apply", "recover")
    if not args or args[0] not in actions:
        raise UserError(f"veil needs an action: faceveil veil {'|'.join(actions)} ...")
    action, rest = args[0], args[1:]
    if not FLAGS.key:
        raise UserError(f"veil {action} needs --key KEYFILE")
    secret = {"passphrase_env": FLAGS.passphrase_env, "passphrase_file": FLAGS.passphrase_file}
    if action == "make":
        if rest:
            raise UserError(f"veil make takes no positional arguments (got {rest}); use --photos")
        if not FLAGS.photos:
            raise UserError("veil make needs --photos DIR (photos of one person)")
        if "," in FLAGS.model:
            raise UserError(f"--model={FLAGS.model}: a veil is made against one recogniser")
        overrides = {"alpha": FLAGS.alpha, "feature_set": FLAGS["feature-set"].value,
                     "block_variance": FLAGS["block-variance"].value}
        if FLAGS.iters is not None:
            overrides["iters"] = FLAGS.iters
        try:
            config = veil_core.VeilConfig(**overrides)
        except ValueError as e:
            raise UserError(str(e)) from None
        veil_cli.make(FLAGS.photos, FLAGS.key, model=FLAGS.model, count=FLAGS.count,
                      config=config, overwrite=FLAGS.overwrite, **secret)
        return
    if not FLAGS.out:
        raise UserError(f"veil {action} needs --out DIR")
    if not rest:
        raise UserError(f"veil {action} needs photos or videos: faceveil veil {action} "
                        "INPUTS... --key KEY --out DIR")
    from faceveil.engine.pipeline import veil_files

    rest = _share(f"veil {action}", rest, veil_files.input_files)
    if not rest:
        return
    model = FLAGS.model if FLAGS["model"].present else None
    getattr(veil_cli, action)(rest, FLAGS.out, key=FLAGS.key, model=model,
                              overwrite=FLAGS.overwrite, **secret)


def _cmd_mask(args):
    from faceveil.engine.commands import mask_cli
    from faceveil.engine.methods import mask
    from faceveil.models import registry

    actions = ("train", "protect", "restore")
    if not args or args[0] not in actions:
        raise UserError(f"mask needs an action: faceveil mask {'|'.join(actions)} ...")
    action, rest = args[0], args[1:]
    try:
        registry.members(registry.get(FLAGS.recognisers))
    except (KeyError, ValueError) as e:
        raise UserError(f"--recognisers: {e.args[0]}") from None
    if action == "train":
        if not FLAGS.faces or not FLAGS.out:
            raise UserError("mask train needs --faces DIR and --out MODEL_DIR")
        if not Path(FLAGS.faces).is_dir():
            raise UserError(f"{FLAGS.faces}: --faces must be a folder of photos")
        try:
            mask_cli.train(FLAGS.faces, FLAGS.recognisers, FLAGS.out, steps=FLAGS.iters)
        except ValueError as e:
            raise UserError(str(e)) from None
        return
    if not FLAGS.out or not FLAGS.keys:
        raise UserError(f"mask {action} needs --out DIR and --keys DIR")
    if not rest:
        raise UserError(f"mask {action} needs photos: faceveil mask {action} IMAGES... "
                        "--out DIR --keys DIR")
    from faceveil.engine.pipeline import recognise

    rest = _share(f"mask {action}", rest, recognise.photo_files)
    if not rest:
        return
    secret = {"passphrase_env": FLAGS.passphrase_env, "passphrase_file": FLAGS.passphrase_file,
              "overwrite": FLAGS.overwrite}
    if action == "restore":
        mask_cli.restore(rest, FLAGS.keys, FLAGS.out, **secret)
        return
    model_dir = FLAGS.model if FLAGS["model"].present else None
    if model_dir is not None and FLAGS["per-image"].present and FLAGS["per-image"].value:
        raise UserError("mask protect: --per-image and --model MODEL_DIR exclude each other")
    if model_dir is None and not FLAGS["per-image"].value:
        raise UserError("mask protect --noper-image needs --model MODEL_DIR (a trained model, "
                        "faceveil mask train)")
    overrides = {"bits": FLAGS.bits}
    if FLAGS.iters is not None:
        overrides["iters"] = FLAGS.iters
    try:
        # Fewer bits come with their preset's tighter visual budget (mask.PRESETS).
        name = f"b{FLAGS.bits}" if f"b{FLAGS.bits}" in mask.PRESETS else "default"
        config = mask.preset(name, **overrides)
    except ValueError as e:
        raise UserError(f"--bits/--iters: {e}") from None
    try:
        mask_cli.protect(rest, FLAGS.out, FLAGS.keys, recognisers=FLAGS.recognisers,
                         config=config, model_dir=model_dir, **secret)
    except FileNotFoundError as e:
        raise UserError(f"--model: {e}") from None
    except ValueError as e:  # a model for other recognisers, or not a mask model (file named)
        raise UserError(str(e)) from None


def _cmd_pmt(args):
    from faceveil.engine.commands import pmt_cli
    from faceveil.engine.methods import pmt
    from faceveil.engine.pipeline import recognise
    from faceveil.models import registry

    if not FLAGS.out:
        raise UserError("pmt needs --out DIR")
    if not args:
        raise UserError("pmt needs at least one image: faceveil pmt IMAGES... --out DIR")
    try:
        rec = registry.get(FLAGS.authorised)
    except (KeyError, ValueError) as e:
        raise UserError(f"--authorised={FLAGS.authorised}: {e.args[0]}") from None
    overrides = {"layers": FLAGS.layers, "init": FLAGS.init, "augment": FLAGS.augment,
                 "kernel": FLAGS.kernel, "kernel_size": FLAGS["kernel-size"].value,
                 "aggregate": FLAGS.aggregate, "pool": FLAGS.pool}
    if FLAGS.iters is not None:
        overrides["iters"] = FLAGS.iters
    if FLAGS.step is not None:
        overrides["step"] = FLAGS.step
    try:
        config = pmt.PmtConfig(**overrides)
        pmt.check_layers(rec, config.layers)
        pmt.check_pool(rec, recognise.recogniser_params(FLAGS.authorised)[1], config.layers,
                       config.pool)
    except ValueError as e:
        raise UserError(f"--layers/--iters/--kernel-size/--pool: {e}") from None
    args = _share("pmt", args, recognise.photo_files)
    if not args:
        return
    pmt_cli.run(args, FLAGS.out, authorised=FLAGS.authorised, config=config,
                upload=FLAGS.upload, overwrite=FLAGS.overwrite)


def _cmd_demo(args):
    from faceveil.engine.commands import demo

    del args
    demo.run(FLAGS.out or "out/demo")


def _cmd_check(args):
    """Returns the exit status: 0 when every photo is protected, EXIT_NOT_PROTECTED if not."""
    from pathlib import Path

    from faceveil.engine.commands import check
    from faceveil.engine.pipeline import image_io
    from faceveil.models import registry

    if args:
        raise UserError(f"check takes no positional arguments (got {args}); use --protected")
    if not FLAGS.protected or not FLAGS.references:
        raise UserError("check needs --protected FILES_OR_DIR[,...] and --references DIR")
    models = list(dict.fromkeys(m.strip() for m in FLAGS.model.split(",") if m.strip()))
    if not models:
        raise UserError("check needs at least one recogniser in --model (e.g. dlib,facenet)")
    for m in models:
        try:
            registry.get(m)
        except KeyError as e:
            raise UserError(f"--model: {e.args[0]}") from None
    # Outputs are checked before the slow part: a .png chart, never one of the input photos.
    inputs = check.protected_files(FLAGS.protected)
    if FLAGS.png:
        if Path(FLAGS.png).suffix.lower() != ".png":
            raise UserError(f"--png {FLAGS.png}: the chart is a PNG; use a .png name")
        image_io.ensure_not_input(FLAGS.png, inputs, overwrite=FLAGS.overwrite)
    if FLAGS.json:
        image_io.ensure_not_input(FLAGS.json, inputs, overwrite=FLAGS.overwrite)
    result = check.check_photos(FLAGS.protected, FLAGS.references, models)
    print(check.format_table(result))
    outputs = {"inputs": inputs, "overwrite": FLAGS.overwrite}
    if FLAGS.png:
        print(f"chart -> {check.write_png(result, FLAGS.png, **outputs)}")
    if FLAGS.json:
        print(f"json -> {check.write_json(result, FLAGS.json, **outputs)}")
    return 0 if result.protected else EXIT_NOT_PROTECTED


def _cmd_attack(args):
    from faceveil.engine.commands import attack_cli
    from faceveil.models import registry

    if len(args) != 1 or args[0] not in attack_cli.KINDS:
        raise UserError(f"attack needs one kind: faceveil attack {'|'.join(attack_cli.KINDS)} "
                        f"--original ... --protected ... (got {args or 'none'})")
    kind = args[0]
    if not FLAGS.original or not FLAGS.protected:
        raise UserError(f"attack {kind} needs --original (clean photos or video) and "
                        "--protected (the protected files)")
    default = "dlib,facenet" if kind in ("data-abuse", "recognise") else "dlib"
    models = list(dict.fromkeys(m.strip() for m in (
        FLAGS.model if FLAGS["model"].present else default).split(",") if m.strip()))
    for m in models:
        try:
            registry.members(registry.get(m))
        except (KeyError, ValueError) as e:
            raise UserError(f"--model: {e.args[0]}") from None
    if not models:
        raise UserError("--model: no recogniser given")
    if kind in ("whitebox", "blackbox", "up") and len(models) != 1:
        raise UserError(f"--model={','.join(models)}: attack {kind} takes one recogniser")
    if kind in ("whitebox", "blackbox"):
        try:
            registry.get(models[0]).check_cut(FLAGS.layers)
        except ValueError as e:
            raise UserError(f"--layers: {e}") from None
    if FLAGS.iters is not None and FLAGS.iters < 1:
        raise UserError(f"--iters must be at least 1, got {FLAGS.iters}")
    try:
        sigmas = None if FLAGS.sigmas is None else tuple(float(s) for s in FLAGS.sigmas)
    except ValueError:
        raise UserError(f"--sigmas: numbers, comma-separated (got {FLAGS.sigmas})") from None
    opts = attack_cli.AttackOptions(
        original=tuple(FLAGS.original), protected=tuple(FLAGS.protected), models=tuple(models),
        layers=FLAGS.layers, iters=FLAGS.iters, kappa=FLAGS.kappa, sigmas=sigmas,
        decoder=FLAGS.decoder, train_faces=FLAGS["train-faces"].value,
        references=FLAGS.references, align=FLAGS.align, frames=FLAGS.frames,
        json_path=FLAGS.json, png_path=FLAGS.png, overwrite=FLAGS.overwrite)
    attack_cli.run(kind, opts)


# Commands whose inputs --distributed splits between the processes (the others have one
# output, or read all inputs at once, and run on one host).
SPLIT_COMMANDS = ("cloak", "pmt", "mask protect", "mask restore", "veil apply", "veil recover")


def _split_name(command: str, args) -> str:
    """Returns the command as SPLIT_COMMANDS names it ('veil apply', 'pmt', ...)."""
    return f"{command} {args[0]}" if command in ("veil", "mask") and args else command


def _join_cluster(command: str, args) -> None:
    """Joins the cluster of --distributed (before anything uses JAX); UserError if it cannot."""
    from faceveil.engine import distributed

    name = _split_name(command, args)
    if command in ("veil", "mask") and name not in SPLIT_COMMANDS + ("veil make", "mask train"):
        return  # no such action: the command's handler says what it needs
    if name not in SPLIT_COMMANDS:
        raise UserError(f"--distributed: {name} runs on one host; the inputs of "
                        f"{', '.join(SPLIT_COMMANDS)} can be split between hosts")
    try:
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
    except (ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"--distributed: cannot join the cluster: {e}") from None


def _share(name: str, args: list[str], expand) -> list[str]:
    """Returns the inputs this process protects: all, or with --distributed its share.

    `expand` lists the input files of the arguments (folders expanded) as the command does,
    so every process splits the same list (`distributed.share`).
    """
    if not FLAGS.distributed:
        return args
    import jax

    from faceveil.engine import distributed

    files = [str(f) for f in expand(args)]
    mine = distributed.share(files)
    pid, n = jax.process_index(), jax.process_count()
    print(f"faceveil {name}: process {pid} of {n}: {len(mine)} of {len(files)} input file(s)"
          f"{': ' + ', '.join(mine) if mine else ''}", file=sys.stderr)
    return mine


_HANDLERS = {
    "fetch-weights": _cmd_fetch_weights,
    "detect": _cmd_detect,
    "compare": _cmd_compare,
    "cloak": _cmd_cloak,
    "cloak-video": _cmd_cloak_video,
    "veil": _cmd_veil,
    "mask": _cmd_mask,
    "pmt": _cmd_pmt,
    "demo": _cmd_demo,
    "check": _cmd_check,
    "attack": _cmd_attack,
}


def _quiet_logging():
    """Logs at WARNING unless the user asked for a level with -v/--verbosity.

    absl.app raises an unset --verbosity to INFO once the flags are parsed, which lets every
    library's INFO records through, e.g. JAX's "Unable to initialize backend 'tpu' ..." on
    each machine without a TPU. Runs before JAX picks its backends; warnings and errors stay.
    """
    from absl import logging

    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def _main(argv):
    command, args = argv[1], argv[2:]
    _quiet_logging()
    from faceveil.engine.pipeline.image_io import InputError
    from faceveil.models.store import StoreError

    try:
        if FLAGS.distributed:
            _join_cluster(command, args)
        # A handler may return an exit status (check: EXIT_NOT_PROTECTED); None means 0.
        # absl's app.run passes what _main returns to sys.exit.
        return _HANDLERS[command](args)
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
