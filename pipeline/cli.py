"""`selftrain`: self-training (Noisy Student) and distillation for image classification. Commands: data (import
images into shards), run (the staged pipeline: teacher, pseudo-labels, noisy students, distillation, pruning,
int8 export, report), status, summarize (mean +- std over seeds), compare (pretraining vs self-training grid),
predict (top-k classes of images), augment preview. `selftrain COMMAND --help` for each."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

from pipeline.core.allocator import keep_freed_memory

if TYPE_CHECKING:
    from pipeline.config.sections import RuntimeConfig

T = TypeVar("T")


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors a user's input can cause: printed as one line, exit code 2.

    Imported here, not at the top, so that `selftrain --help` and `--version` answer without importing torch."""
    from augment import PolicyError
    from pipeline.config.schema import ConfigError
    from pipeline.core.atomic import ArtifactError, WriteFailed
    from pipeline.core.output_paths import OutputPathError
    from pipeline.core.owned import ForeignFilesError
    from pipeline.core.rundir import RunDirError
    from pipeline.data.imageset import DataDirError
    from pipeline.data.shards import ShardError
    from pipeline.data.sources.fashion_mnist import DataSourceError
    from pipeline.data.pool import PoolError
    from pipeline.engine.per_rank import ResumeStateError
    from pipeline.engine.ranks import RankError
    from pipeline.engine.training import TrainingDiverged
    from pipeline.engine.serving import IMAGE_SUFFIXES, PredictError
    from pipeline.experiments.compare import BudgetError
    from students.prune import PruneError
    from teachers.checkpoint import CheckpointError
    from teachers.init_sources import InitError
    from teachers.models import ModelError
    from teachers.sidecar import SidecarError

    return (ConfigError, DataSourceError, ShardError, RunDirError, DataDirError, ForeignFilesError, ArtifactError,
            WriteFailed, PolicyError, CheckpointError, ModelError, PoolError, SidecarError, PredictError,
            InitError, BudgetError, PruneError, OutputPathError, ResumeStateError, RankError,
            TrainingDiverged)


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("selftrain")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _at_least(least: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `least` (argparse names the flag when it is not)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value
    return parse


def _add_split_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory for shards + manifest.json")
    parser.add_argument("--labels-per-class", type=int, default=100, help="human labels per class (default 100)")
    parser.add_argument("--holdout-per-class", type=int, default=0,
                        help="of those labels, how many per class go to holdout/ for tuning (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the labeled draw (default 0)")
    parser.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default 5000)")
    parser.add_argument("--max-unlabeled", type=int, default=None,
                        help="keep only this many (seeded) images of the unlabeled pool (default: all)")
    parser.add_argument("--classes", default=None, metavar="NAME,...",
                        help="keep only these classes (names or indices), renumbered 0..k-1 in this order")
    parser.add_argument("--out-of-domain-unlabeled", action="store_true",
                        help="with --classes: the other classes' training images join the unlabeled pool, unlabeled")


EXAMPLES = """examples:
  selftrain run configs/fashion_mnist.yaml --run-dir runs/demo          # the whole pipeline (make demo)
  selftrain run configs/fashion_mnist.yaml --run-dir runs/demo --preset quick
  selftrain status runs/demo
  selftrain run configs/fashion_mnist.yaml --run-dir runs/demo --from student_r1 --set student.train.lr=0.1
  torchrun --nproc_per_node 2 -m pipeline.cli run configs/fashion_mnist.yaml --run-dir runs/demo
  selftrain data folder ~/photos --out data/photos --labels-per-class 100
  selftrain predict runs/demo/export/distill_shufflenet_v2_x1_0.int8.onnx ~/photos/test --top-k 3
  selftrain compare configs/compare_fashion_mnist.yaml --dry-run
  selftrain summarize runs/seed0 runs/seed1 runs/seed2"""

STAGE_NAMES = ("data, teacher, pseudo_label_rN, select_rN, student_rN, distill_ARCH, prune_ARCH, export, report "
               "(`selftrain status RUN` lists a run's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selftrain", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="import a data set into webdataset shards")
    data_sub = data.add_subparsers(dest="kind", required=True)
    fm = data_sub.add_parser("fashion-mnist", help="Fashion-MNIST from its raw idx .gz files",
                             description="Import Fashion-MNIST: N labeled images per class (the rest of the training "
                                         "split is the unlabeled pool, its labels kept hidden for measuring "
                                         "pseudo-labels), an optional holdout, and the test split.")
    _add_split_args(fm)
    fm.add_argument("--source", dest="source_dir", default=None, help="directory with the idx .gz files "
                    "(default: /usr/share/datasets/fashion-mnist, then ~/.cache/selftrain/fashion-mnist)")
    folder = data_sub.add_parser(
        "folder", help="a folder with one sub-folder of images per class",
        description="Import SRC/<class>/**/*.png|jpg|jpeg|webp: the classes are the sub-folder names, sorted; "
                    "each class folder is searched recursively; dot-files and dot-folders are skipped, other files "
                    "are counted and named. The original bytes are stored (no re-encoding).")
    folder.add_argument("src", help="the image folder")
    _add_split_args(folder)
    folder.add_argument("--test-fraction", type=float, default=0.2, help="fraction of each class held out as test (default 0.2)")

    run = sub.add_parser(
        "run", help="run the pipeline stages of a config",
        description="Run (or resume) every stage of a config in its run directory. data.source in the config "
                    "picks the data: fashion-mnist, folder (data.path: an image folder), shards (data.path: a "
                    "directory made by `selftrain data`) or webdataset (data.webdataset: other tools' shard "
                    "URLs, used in place; README \"Shards written by other tools\"). Launch under torchrun or accelerate launch for "
                    "several processes.")
    run.add_argument("config", help="YAML config, e.g. configs/fashion_mnist.yaml")
    run.add_argument("--run-dir", default=None, help="run directory (default: runs/<config name>)")
    run.add_argument("--only", default=None, metavar="STAGE",
                     help=f"run just this stage (its inputs must be done); stages: {STAGE_NAMES}")
    run.add_argument("--from", dest="start", default=None, metavar="STAGE",
                     help="forget this stage and every stage that depends on it, and redo them")
    run.add_argument("--preset", default=None, help="named overrides applied before --set: quick (a 10,000-image "
                     "pool and short training, every stage)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set teacher.train.epochs=10 (repeatable); the value "
                          "is YAML (quote strings with ' #'), a list is given whole (--set 'distill.students=[{arch: "
                          "mobilenetv3_small_100, input_size: 64}]'), a mapping sets the keys it names")

    status = sub.add_parser("status", help="list the stages of a run directory and their state",
                            description="Each stage of a run directory: done, running (with its progress), failed "
                                        "(with the error), pending; wall time and test top-1 where known. Reads only.")
    status.add_argument("run_dir", help="a run directory (the --run-dir of selftrain run)")

    summarize = sub.add_parser("summarize", help="mean +- std of each stage over several run directories (seeds)",
                               description="One Markdown table over finished runs (e.g. one per seed): per stage, "
                               "test and holdout top-1 (mean +- sample std), the gain of each student round over "
                               "its run's teacher and of each distilled student over the teacher it was taught by, "
                               "pseudo-label accuracy, wall time. Notes runs whose configs differ in more than "
                               "their seeds, or that share seeds.")
    summarize.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (--run-dir of selftrain run)")
    summarize.add_argument("--out", default=None, help="also write the table to this Markdown file (.md; replaces "
                           "only a table summarize wrote)")

    compare = sub.add_parser("compare", help="pretraining vs self-training: run an experiment grid and report it",
                             description="Run every arm of a compare config (init x self-training x policy x labels "
                             "x seeds) with one training budget, sharing imports, pretraining and teachers; "
                             "resumable (rerun the same command); writes OUT/report/{report.md,summary.csv,*.png}.")
    compare.add_argument("config", help="compare config, e.g. configs/compare_fashion_mnist.yaml")
    compare.add_argument("--out", default=None, help="output directory (default: runs/<config name>)")
    compare.add_argument("--only", default=None, metavar="AXIS=VALUE[,...]",
                         help="run only the matching arms, e.g. 'policy=s4' or 'init=random,seed=0'")
    compare.add_argument("--dry-run", action="store_true", help="print the plan and estimated cost, run nothing")
    compare.add_argument("--keep-going", action="store_true",
                         help="a failed job does not stop the grid: the other jobs run, the report covers the "
                              "finished arms (marked partial), the failed jobs are named at the end (exit 1)")

    predict = sub.add_parser("predict", help="top-k classes of images from a checkpoint directory or an .onnx file",
                             description="Top-k class names and probabilities of each image, with the model's own "
                                         "preprocessing (input size, mean/std and classes travel with a checkpoint "
                                         "and inside an exported .onnx). An unreadable image is named on stderr and "
                                         "the others are still predicted (exit 2 when any failed).")
    predict.add_argument("model", help="a checkpoint directory (RUN/<stage>/checkpoint) or an exported .onnx file")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                         help="image files (any format Pillow reads), or folders searched recursively for "
                              ".png/.jpg/.jpeg/.webp/.bmp/.gif/.tif/.tiff (dot-files skipped; other files named)")
    predict.add_argument("--top-k", type=int, default=3, help="classes per image (default 3)")
    predict.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    predict.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")

    augment = sub.add_parser("augment", help="augmentation tools")
    aug_sub = augment.add_subparsers(dest="action", required=True)
    preview = aug_sub.add_parser("preview", help="save a grid: rows are images, columns augmented draws",
                                 description="A PNG grid to see what a policy (s1-s4) does to your images: the first "
                                             "column is the eval view, the others seeded augmented draws.")
    preview.add_argument("--policy", required=True, help="policy string, e.g. s1, s4, s4-n2-m10")
    preview.add_argument("--data", required=True,
                         help="an imported data directory, one of its split folders, or a shard (.tar, .tar.gz, "
                              ".tgz, .tar.bz2, .tar.xz, or its URL / pipe: command)")
    preview.add_argument("--out", required=True, help="output PNG (replaces only a grid preview wrote)")
    preview.add_argument("--images", type=_at_least(1), default=8, help="rows (default 8)")
    preview.add_argument("--draws", type=_at_least(1), default=8, help="augmented columns per image (default 8)")
    preview.add_argument("--size", type=_at_least(1), default=64, help="output size of the policy (default 64)")
    preview.add_argument("--seed", type=_at_least(0), default=0, help="seed of the augmented draws (default 0)")
    return parser


def _cmd_data(args: argparse.Namespace) -> None:
    from pipeline.core.output_paths import check_output_dir
    from pipeline.core.owned import one_writer
    from pipeline.data.importer import ClassFilter, import_fashion_mnist, import_folder, refuse_output_inside_source
    from pipeline.data.sources.fashion_mnist import DataSourceError

    check_output_dir(Path(args.out))
    if args.kind == "folder":
        refuse_output_inside_source(Path(args.out), Path(args.src), "--out")
    if args.out_of_domain_unlabeled and not args.classes:
        raise DataSourceError("--out-of-domain-unlabeled needs --classes (which classes are the target task)")
    if args.classes is not None and not any(c.strip() for c in args.classes.split(",")):
        raise DataSourceError(f"--classes {args.classes!r}: no class named; list names or indices, e.g. --classes 0,3")
    keep = ClassFilter(tuple(c.strip() for c in args.classes.split(",")), args.out_of_domain_unlabeled) \
        if args.classes else None
    common = dict(per_class=args.labels_per_class, holdout_per_class=args.holdout_per_class,
                  seed=args.seed, shard_size=args.shard_size, max_unlabeled=args.max_unlabeled, class_filter=keep)
    with one_writer(Path(args.out), "selftrain data"):
        if args.kind == "fashion-mnist":
            manifest = import_fashion_mnist(args.out, source=args.source_dir, **common)
        else:
            manifest = import_folder(args.src, args.out, test_fraction=args.test_fraction, **common)
    counts = ", ".join(f"{k} {v['count']}" for k, v in manifest["splits"].items())
    print(f"imported {manifest['num_classes']} classes into {args.out}: {counts}")
    names = manifest["classes"]
    print(f"classes (labels 0..{len(names) - 1}): {', '.join(names[:20])}" + (", ..." if len(names) > 20 else ""))


def _loaded_on_every_process(load: Callable[[], T], runtime_of: Callable[[T], RuntimeConfig]) -> T:
    """`load()` (a config, checked) on every process, then the one process state: under several processes one
    process's error stops them all with its message (they would wait for it in their first collective)."""
    from pipeline.config.sections import RuntimeConfig
    from pipeline.engine.ranks import all_or_none
    from pipeline.engine.runtime import process_state
    from pipeline.stages.runner import end_processes

    try:
        loaded, error = load(), None
    except Exception as exc:  # noqa: BLE001 - raised on this process by all_or_none, named on the others
        loaded, error = None, exc
    runtime = RuntimeConfig() if loaded is None else runtime_of(loaded)
    state = process_state(runtime.dist_timeout_minutes, runtime.peer_timeout_s)
    try:
        all_or_none(state, error)
    except Exception:
        end_processes(state)
        raise
    return loaded  # type: ignore[return-value]


def _cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.core.output_paths import check_output_dir
    from pipeline.experiments.compare import JobsFailed, run_compare
    from pipeline.experiments.compare_config import load_compare_config

    out = args.out or str(Path("runs") / Path(args.config).stem)

    def load():
        check_output_dir(Path(out))
        return load_compare_config(args.config)

    config = _loaded_on_every_process(load, lambda c: c.base_config().runtime)
    try:
        run_compare(config, out, only=args.only, dry_run=args.dry_run, keep_going=args.keep_going)
    except JobsFailed as failed:
        print(f"selftrain: error: {failed}", file=sys.stderr)
        return 1
    return 0


def _cmd_run(args: argparse.Namespace) -> None:
    from pipeline.config.loading import load_config
    from pipeline.config.presets import preset_overrides
    from pipeline.core.rundir import RunDirError
    from pipeline.engine.runtime import process_state
    from pipeline.stages.runner import run_pipeline

    if args.run_dir is not None and not args.run_dir.strip():
        raise RunDirError("--run-dir '': give a directory (or leave --run-dir out for runs/<config name>)")
    config = _loaded_on_every_process(lambda: load_config(args.config, preset_overrides(args.preset) + args.overrides),
                                      lambda c: c.runtime)
    run_dir = args.run_dir or str(Path("runs") / Path(args.config).stem)
    run_pipeline(config, run_dir, only=args.only, start=args.start)
    if process_state().is_main_process:
        print(f"run directory: {run_dir}")


def _cmd_status(args: argparse.Namespace) -> None:
    from pipeline.stages.status import describe

    rows = describe(args.run_dir)
    if not rows:
        print(f"{args.run_dir}: no stage has run yet (no config.yaml); `selftrain run CONFIG --run-dir "
              f"{args.run_dir}` starts it")
        return
    width = max(len(stage) for stage, _ in rows)
    for stage, state in rows:
        print(f"{stage:{width}s}  {state}")


def _cmd_summarize(args: argparse.Namespace) -> None:
    from pipeline.core.atomic import write_text
    from pipeline.core.output_paths import check_output_file
    from pipeline.experiments.summary import is_summary_file, summary_file_text, summary_table

    if args.out:
        check_output_file(Path(args.out), flag="--out", suffix=".md", command="selftrain summarize",
                          written_by_us=is_summary_file)
    table = summary_table([Path(d) for d in args.run_dirs])
    print(table)
    if args.out:
        write_text(Path(args.out), summary_file_text(table))


def _cmd_predict(args: argparse.Namespace) -> int:
    import json

    from pipeline.engine.serving import IMAGE_SUFFIXES, PredictError, find_images, load_predictor, predict_files

    if args.top_k < 1:
        raise PredictError(f"--top-k {args.top_k}: must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise PredictError(f"--threads {args.threads}: must be at least 1 (leave it out to use every core)")
    if args.threads:
        torch_threads(args.threads)
    files, others = find_images(args.images)
    skipped = (f"{len(others)} file(s) without an image suffix ({', '.join(IMAGE_SUFFIXES)}) skipped, e.g. "
               f"{others[0]}; name a file to read it whatever its suffix" if others else "")
    if not files:
        raise PredictError(f"no image files in {' '.join(args.images)}" + (f": {skipped}" if skipped else ""))
    predictor = load_predictor(args.model, args.threads)
    if skipped:
        print(f"selftrain: note: {skipped}", file=sys.stderr)
    if hasattr(sys.stdout, "reconfigure"):  # a file name's non-UTF-8 bytes are written back as they were
        sys.stdout.reconfigure(errors="surrogateescape")
    failed = 0
    for result in predict_files(predictor, files, min(args.top_k, len(predictor.meta.class_names))):
        if "error" in result:
            failed += 1
            print(f"selftrain: error: {result['image']}: {result['error']}", file=sys.stderr)
        if args.json:
            print(json.dumps(result), flush=True)
        elif "top" in result:
            print(f"{result['image']}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in result["top"]),
                  flush=True)
    return 2 if failed else 0


def torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _cmd_preview(args: argparse.Namespace) -> None:
    from augment import build_policy
    from augment.preview import is_preview_png, make_preview_grid, save_preview_grid
    from pipeline.core.atomic import WriteFailed
    from pipeline.core.output_paths import check_output_file
    from pipeline.data.preview import sample_images

    check_output_file(Path(args.out), flag="--out", suffix=".png", command="selftrain augment preview",
                      written_by_us=is_preview_png)
    images = sample_images(args.data, args.images)
    grid = make_preview_grid(images, build_policy(args.policy, args.size), args.draws, args.seed)
    try:
        save_preview_grid(grid, Path(args.out))
    except OSError as exc:
        raise WriteFailed(f"--out {args.out}: cannot write it ({exc.strerror}); nothing was written") from None
    print(f"saved {args.out}: {len(images)} images x {args.draws} draws of policy {args.policy}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()  # glibc: no page faults on every training step (pipeline/core/allocator.py)
    handlers = {"data": _cmd_data, "run": _cmd_run, "status": _cmd_status, "summarize": _cmd_summarize,
                "augment": _cmd_preview, "predict": _cmd_predict, "compare": _cmd_compare}
    try:
        code = handlers[args.command](args)
        sys.stdout.flush()  # inside the try: a reader that left shows here, not at interpreter exit
    except BrokenPipeError:  # `selftrain status RUN | head`: the reader left (checked before _user_errors(): torch)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except _user_errors() as exc:
        print(f"selftrain: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumable = args.command in ("run", "compare")
        print("selftrain: interrupted" + ("; rerun the same command to resume" if resumable else ""), file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
