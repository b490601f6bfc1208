"""Every benchmark at one size, one table and one PNG for the README (issue 15 item 4).

    python -m benchmarks.suite --json out/suite.json [--data ../shared/data] [--only a,b]
        [--merge other_backend.json] [--extend earlier.json] [--timeout_s 900]

Each benchmark runs as its own process (`python -m benchmarks.<name> ... --json <tmp>`) at the
size of its backend: on a CPU a size that keeps the whole suite near 20 minutes on 2 cores
(`SUITE[...]["cpu"]`), on a GPU the sizes the issues' targets are stated at (`"gpu"`). The
headline figures of each report are collected into rows (benchmark, figure, value, command);
compile time stays apart where the benchmark reports it. The same command on a GPU fills the
GPU column: `--merge` takes the report of a run on the other backend, and the table shows both
columns ("not measured" where no run on that backend exists).

Writes the JSON (with a markdown `table` ready for the README) and a PNG beside it (same name,
.png): the table as an image, and each benchmark's wall time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
from absl import app, flags
from matplotlib.figure import Figure

from benchmarks import parity_dlib
from faceveil.engine.commands import report as report_lib
from faceveil.engine.pipeline import image_io, progress

FLAGS = flags.FLAGS
VIDEO = "video/hamilton_clip.mp4"

# name -> {"cpu": args, "gpu": args, "figures": [(label, dotted path in the report)]}.
# {data} is replaced by the data folder.
SUITE = {
    "recogniser_throughput": {
        "cpu": ["--model", "dlib", "--batch", "8", "--iters", "3"],
        "gpu": ["--model", "dlib", "--batch", "256"],
        "figures": [("dlib chips/s forward+backward", "chips_per_s.forward_backward"),
                    ("dlib chips/s forward", "chips_per_s.forward"),
                    ("compile s (forward+backward)", "compile_s.forward_backward")]},
    "detect_throughput": {
        "cpu": ["--sizes", "640x360", "--batch", "4", "--repeats", "2", "--data", "{data}"],
        "gpu": ["--sizes", "1280x720,1920x1080", "--batch", "32", "--data", "{data}"],
        "figures": [("MTCNN frames/s (first size)", "results.0.frames_per_s"),
                    ("first call s (compile incl.)", "results.0.first_call_s_incl_compile")]},
    "cloak_throughput": {
        "cpu": ["--batch", "8", "--repeats", "1"],
        "gpu": ["--batch", "256", "--repeats", "3"],
        "figures": [("photo cloak faces/s (40 iterations, dlib)", "faces_per_s"),
                    ("face-iterations/s", "face_iterations_per_s"),
                    ("compile s", "compile_s")]},
    "iterations_saved": {
        "cpu": ["--video", "{data}/" + VIDEO, "--frames", "12", "--modes", "none,affine",
                "--attackers", "ours", "--references", "{data}/faces"],
        "gpu": ["--video", "{data}/" + VIDEO, "--references", "{data}/faces"],
        "figures": [("video: iterations saved by affine reuse", "affine.iterations_saved"),
                    ("video: wall time saved", "affine.wall_time_saved"),
                    ("video: face-iterations/s (affine)", "affine.face_iterations_per_s")]},
    "photo_protection": {
        "cpu": ["--data", "{data}", "--max_photos", "3", "--two_model", "dlib"],
        "gpu": ["--data", "{data}"],
        "figures": [("photos: dlib protected rate (dlib-bin)", "summary.dlib_protected_rate"),
                    ("photos: face SSIM", "summary.face_ssim_mean"),
                    ("photos: seconds per face", "summary.seconds_per_face")]},
    "veil": {
        "cpu": ["--data", "{data}", "--identities", "obama", "--iters", "30", "--variants",
                "default"],
        "gpu": ["--data", "{data}"],
        "figures": [("veil: MSR white-box", "summary.msr_white_box"),
                    ("veil: SSIM protected", "summary.ssim_protected"),
                    ("veil: seconds per identity", "summary.seconds_per_identity")]},
    "pmt": {
        "cpu": ["--data", "{data}", "--max_faces", "2", "--iters", "20", "--recon_iters", "20",
                "--ablation_faces", "0", "--noblackbox"],
        "gpu": ["--data", "{data}"],
        "figures": [("PMT: authorised accuracy", "summary.authorised_accuracy"),
                    ("PMT: unauthorised accuracy", "summary.unauthorised_accuracy"),
                    ("PMT: faces/s", "summary.faces_per_second")]},
    "mask": {
        "cpu": ["--data", "{data}", "--max_photos", "2", "--iters", "10", "--bits", "4",
                "--against", "dlib", "--modes", "per-image"],
        "gpu": ["--data", "{data}"],
        "figures": [("mask: restores bit-exact", "summary.restore_bit_exact_fraction"),
                    ("mask: per-image F_c (1:N)", "summary.f_c_per_image"),
                    ("mask: protect s/photo", "summary.protect_seconds_per_photo_{backend}")]},
    "profile": {
        "cpu": ["--engine", "cloak", "--batch", "2", "--iters", "40", "--repeats", "1",
                "--host_photos", "3"],
        "gpu": ["--engine", "cloak", "--batch", "256", "--iters", "10"],
        "figures": [("profile: cloak ms per iteration (whole batch)", "ms_per_iteration"),
                    ("profile: costliest traced part", "trace.parts.0.part"),
                    ("profile: its share of the traced time", "trace.parts.0.share")]},
}


def _define_flags() -> None:
    flags.DEFINE_string("json", None, "Write the report here (the PNG beside it).")
    flags.DEFINE_string("data", str(parity_dlib.DEFAULT_DATA),
                        "The shared data folder (faces/, multi/, video/).")
    flags.DEFINE_list("only", None, f"Run only these benchmarks ({', '.join(SUITE)}).")
    flags.DEFINE_string("merge", None, "A suite report of the other backend (its column).")
    flags.DEFINE_string("extend", None, "A suite report of this backend whose runs of the "
                        "benchmarks not run now are kept (e.g. --only one, then the rest).")
    flags.DEFINE_integer("timeout_s", 900, "Most seconds one benchmark may run.")


def lookup(report, path: str):
    """Returns the value at a dotted path ("a.0.b": keys and list indices), or None."""
    v = report
    for part in path.split("."):
        if isinstance(v, list) and part.isdigit() and int(part) < len(v):
            v = v[int(part)]
        elif isinstance(v, dict) and part in v:
            v = v[part]
        else:
            return None
    return v


def run_one(name: str, backend: str, data: Path, timeout_s: int) -> dict:
    """Returns the record of one benchmark run: command, rc, wall time, figures."""
    spec = SUITE[name]
    args = [a.replace("{data}", str(data)) for a in spec["gpu" if backend == "gpu" else "cpu"]]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *args, "--json", str(out)]
        shown = "python -m " + " ".join([f"benchmarks.{name}", *args, "--json", "out.json"])
        progress.say(f"suite: {shown}")
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                  check=False, cwd=Path(__file__).resolve().parent.parent,
                                  env={**os.environ, "PYTHONPATH": str(
                                      Path(__file__).resolve().parent.parent)})
            rc, tail = proc.returncode, proc.stderr[-600:]
        except subprocess.TimeoutExpired:
            rc, tail = "timeout", f"over {timeout_s} s"
        wall = time.perf_counter() - t
        report = json.loads(out.read_text()) if out.is_file() else {}
    figures = {}
    for label, path in spec["figures"]:
        v = lookup(report, path.replace("{backend}", backend))
        figures[label] = v if not isinstance(v, dict) else json.dumps(v)
    rec = {"benchmark": name, "command": shown, "rc": rc, "wall_s": round(wall, 1),
           "figures": figures}
    if rc != 0:
        rec["error"] = tail
    progress.say(f"suite: {name}: rc {rc}, {wall:.0f} s, {figures}")
    return rec


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(runs: dict[str, list[dict]]) -> tuple[list[str], list[list[str]]]:
    """Returns (columns, rows) of the figures of every backend's runs (CPU, GPU columns)."""
    cols = ["benchmark", "figure", "CPU", "GPU"]
    by = {b: {r["benchmark"]: r for r in rs} for b, rs in runs.items()}
    rows = []
    for name, spec in SUITE.items():
        if not any(name in by.get(b, {}) for b in ("cpu", "gpu")):
            continue
        for label, _ in spec["figures"] + [("wall s (whole benchmark)", None)]:
            cells = []
            for b in ("cpu", "gpu"):
                r = by.get(b, {}).get(name)
                if r is None:
                    cells.append("not measured")
                elif label.startswith("wall s"):
                    cells.append(_fmt(r["wall_s"]) + ("" if r["rc"] == 0 else f" (rc {r['rc']})"))
                else:
                    cells.append(_fmt(r["figures"].get(label)))
            rows.append([name, label, *cells])
    return cols, rows


def markdown(cols, rows) -> str:
    """Returns the table as GitHub markdown."""
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_png(path: Path, cols, rows, runs: dict, title: str) -> None:
    """Writes the table as an image above a bar chart of each benchmark's wall time."""
    fig = Figure(figsize=(11, 0.28 * len(rows) + 4.0), dpi=90, layout="constrained")
    fig.suptitle(title, fontsize=9)
    ax_t, ax_b = fig.subplots(2, 1, height_ratios=[0.28 * len(rows) + 0.5, 2.5])
    ax_t.axis("off")
    t = ax_t.table(cellText=rows, colLabels=cols, loc="center", cellLoc="left")
    t.auto_set_font_size(False)
    t.set_fontsize(7)
    for b, rs in runs.items():
        names = [r["benchmark"] for r in rs]
        ax_b.barh([f"{n} ({b})" for n in names], [r["wall_s"] for r in rs])
    ax_b.set_xlabel("wall seconds per benchmark (compile included)", fontsize=8)
    ax_b.tick_params(labelsize=7)
    report_lib._save(fig, path)


def main(argv: list[str]) -> int:
    """Runs the suite; prints and writes its report."""
    del argv
    backend = "gpu" if jax.default_backend() == "gpu" else "cpu"
    names = FLAGS.only or list(SUITE)
    unknown = set(names) - set(SUITE)
    if unknown:
        print(f"suite: --only: unknown {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    data = Path(FLAGS.data)
    t0 = time.perf_counter()
    runs = {backend: [run_one(n, backend, data, FLAGS.timeout_s) for n in names]}
    if FLAGS.extend:
        earlier = json.loads(Path(FLAGS.extend).read_text()).get("runs", {}).get(backend, [])
        runs[backend] += [r for r in earlier if r["benchmark"] not in names]
        order = list(SUITE)
        runs[backend].sort(key=lambda r: order.index(r["benchmark"]))
    if FLAGS.merge:
        other = json.loads(Path(FLAGS.merge).read_text())
        for b, rs in other.get("runs", {}).items():
            runs.setdefault(b, rs)
    cols, rows = table(runs)
    rep = {"benchmark": "suite", "date": time.strftime("%Y-%m-%d"), "backend": backend,
           "device": jax.devices()[0].device_kind, "cpu_count": len(os.sched_getaffinity(0)),
           "wall_s": round(time.perf_counter() - t0, 1), "runs": runs,
           "columns": cols, "rows": rows, "table": markdown(cols, rows)}
    print(json.dumps(rep, indent=1))
    if FLAGS.json:
        png = Path(FLAGS.json).with_suffix(".png")
        rep["png"] = str(png)
        image_io.write_json(FLAGS.json, rep)
        write_png(png, cols, rows, runs, f"faceveil benchmark suite, {rep['date']}, "
                  f"{rep['device']} ({rep['cpu_count']} CPU cores)")
    failed = [r["benchmark"] for r in runs[backend] if r["rc"] != 0]
    if failed:
        print(f"suite: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    _define_flags()
    app.run(main)
