"""python -m engine.train: tokenizers, then the model, then samples and the evaluation.

Stages, all in one run directory (see engine/run_artifacts.py for the layout), each skipped
when its output already exists: BPE -> VQ-VAE (+ its report) -> shape classifier (the
evaluation's judge) -> tokenised corpus -> [retrieval: dual encoder, memory bank, offline
neighbour pass (engine/retrieval/stage.py), when on] -> validation sets -> model (its
validation loss every train.eval_every steps) -> sample grid, loss curve, prompt accuracy.

  python -m engine.train                              # tiny preset on the built-in shapes data
  python -m engine.train --preset cm3leon-7b --dry-run
  python -m engine.train --out runs/a --resume        # continue where runs/a stopped
  python -m engine.train --set train.lr=1e-3 --set model.n_layers=6
  python -m engine.train --out runs/rag --retrieve 2 --set model.max_seq_len=384
  python -m engine.train --sft-from runs/tiny         # instruction tuning into runs/tiny-sft

--sft-from RUN instruction-tunes RUN's model (text -> image, captioning, question answering,
editing; loss on the outputs only) into a run directory of its own (engine/instruction_tuning.py).

Ctrl-C (or SIGTERM) during the VQ-VAE's or the model's training stops at the end of the step
with a checkpoint; --resume continues from there (and from the VQ-VAE's periodic save, or the
first unfinished stage, after a crash). A second Ctrl-C stops at once.

  torchrun --standalone --nproc_per_node 8 -m engine.train --preset cm3leon-350m --out runs/350m

trains data-parallel, one process per GPU, with the same results as one process on the
whole batch (engine/distributed.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from engine import distributed
from engine.checkpoint import CheckpointError
from engine.config import PRESETS, EngineConfig, get_preset
from engine.data.corpus import DATASETS
from engine.devices import check_device
from engine.distributed import DataParallel
from engine.stop_request import TrainingStopped

log = logging.getLogger("engine.train")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m engine.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help=f"model/data preset: {', '.join(PRESETS)} "
                    "(default: tiny)")
    ap.add_argument("--data", default=None, help=f"dataset: {', '.join(DATASETS)} (default: the preset's)")
    ap.add_argument("--out", type=Path, default=None,
                    help="run directory (default: runs/tiny; with --sft-from, RUN-sft)")
    ap.add_argument("--sft-from", type=Path, default=None, metavar="RUN",
                    help="instruction-tune the model of the finished run RUN (its config, "
                         "tokenizers and weights; --steps and --set then change the tuning)")
    ap.add_argument("--steps", type=int, default=None, help="model training steps (default: the preset's)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped: its "
                    "finished stages are kept, training goes on from the latest checkpoint")
    ap.add_argument("--dry-run", action="store_true",
                    help="build the model on the meta device, print config and parameter count, exit")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override any config field, e.g. train.lr=1e-3 (repeatable)")
    ap.add_argument("--retrieve", type=int, default=None, metavar="K",
                    help="retrieval-augmented pretraining with K neighbours per document "
                         "(0 = off; sets retrieval.enabled and retrieval.k; needs a context "
                         "that holds K + 1 documents, e.g. --set model.max_seq_len=384)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--no-eval", action="store_true", help="skip the prompt-accuracy evaluation at the end")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def apply_overrides(cfg: EngineConfig, pairs: list[str]) -> EngineConfig:
    d = cfg.to_dict()
    for pair in pairs:
        key, eq, value = pair.partition("=")
        section, dot, name = key.partition(".")
        if not eq or not dot or section not in d or name not in d[section]:
            raise ValueError(f"bad --set {pair!r}: use SECTION.FIELD=VALUE with a known field, "
                             f"sections: {', '.join(k for k in d if isinstance(d[k], dict))}")
        current = d[section][name]
        try:
            d[section][name] = json.loads(value) if not isinstance(current, str) else value
        except json.JSONDecodeError as exc:
            raise ValueError(f"bad --set {pair!r}: {value!r} is not a valid value") from exc
    return EngineConfig.from_dict(d)


def resolve_config(args) -> EngineConfig:
    if args.sft_from is not None:
        if args.preset or args.data or args.retrieve:
            raise ValueError("--sft-from takes the model, data and retrieval of its run: drop "
                             "--preset, --data and --retrieve")
        from engine.instruction_tuning import sft_config
        cfg = sft_config(args.sft_from)
        if args.steps is not None:
            cfg.train.steps = args.steps
        return apply_overrides(cfg, args.set)
    cfg = get_preset(args.preset or "tiny")
    if args.data is not None:
        if args.data not in DATASETS:
            raise ValueError(f"unknown dataset {args.data!r}; choose one of: {', '.join(DATASETS)}")
        cfg.data.dataset = args.data
    if args.steps is not None:
        cfg.train.steps = args.steps
    if args.retrieve is not None:
        if args.retrieve < 0:
            raise ValueError("--retrieve takes the number of neighbours K >= 0 (0 = off)")
        cfg.retrieval.enabled = args.retrieve > 0
        cfg.retrieval.k = args.retrieve or cfg.retrieval.k
    return apply_overrides(cfg, args.set)


def dry_run(cfg: EngineConfig) -> None:
    from engine.model import Transformer
    from engine.tokenizer.vocab import Vocab
    t0 = time.time()
    with torch.device("meta"):
        model = Transformer(cfg.model, Vocab.from_config(cfg.vocab).size)
    print(json.dumps(cfg.to_dict(), indent=2))
    n = model.num_parameters()
    print(f"preset {cfg.preset}: {n:,} parameters ({n / 1e9:.2f}B), vocab {cfg.vocab.size:,}, "
          f"context {cfg.model.max_seq_len:,}; built on the meta device in {time.time() - t0:.1f} s")


def prepare_run_dir(args, cfg: EngineConfig) -> EngineConfig:
    from engine.run_artifacts import RunDir
    run = RunDir(args.out)
    if args.resume:
        # A run stopped before its first model checkpoint (in the tokenizer stage, say) has
        # only its config and finished stages: it resumes from its first unfinished stage.
        saved = run.load_config()               # clear error when --out is not a run
        saved.train.steps = cfg.train.steps if args.steps is not None else saved.train.steps
        return saved
    if run.config.is_file():
        raise FileExistsError(f"{run.root} already holds a run: pass --resume to continue it, "
                              "or choose another --out")
    run.root.mkdir(parents=True, exist_ok=True)
    cfg.save(run.config)
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.out is None:
        args.out = Path("runs/tiny") if args.sft_from is None else Path(f"{args.sft_from}-sft")
    dp = DataParallel() if args.dry_run else distributed.from_env()
    logging.basicConfig(level=logging.INFO if dp.main else logging.WARNING, format="%(message)s")
    try:
        if args.resume and args.sft_from is not None:
            raise ValueError("--resume continues the run in --out as it was configured: drop "
                             "--sft-from")
        check_device(args.device)
        cfg = resolve_config(args)
        if args.dry_run:
            dry_run(cfg)
            return 0
        cfg = _prepare_on_rank_0(args, cfg, dp)
        if cfg is None:
            return 2  # rank 0 failed to prepare the run and said why
        from engine.host_memory import keep_freed_memory
        keep_freed_memory()
        kwargs = dict(device=args.device, resume=args.resume, evaluate=not args.no_eval,
                      progress=not args.quiet)
        if cfg.sft.source_run:
            from engine.instruction_tuning import run_instruction_tuning
            run_instruction_tuning(cfg, args.out, dp=dp, **kwargs)
        else:
            from engine.pipeline import run_pipeline
            run_pipeline(cfg, args.out, dp=dp, **kwargs)
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:
        if dp.main:
            how = ("the same torchrun command with --resume" if dp.active else
                   f"python -m engine.train --out {args.out} --resume")
            print(f"{stopped}; continue with: {how}", file=sys.stderr)
        return stopped.exit_code
    finally:
        distributed.leave(dp)
    return 0


def _prepare_on_rank_0(args, cfg: EngineConfig, dp: DataParallel) -> EngineConfig | None:
    """prepare_run_dir on rank 0 (the only writer); the other processes wait for it and then
    read the same config. None on every process when rank 0 failed."""
    if not dp.active:
        return prepare_run_dir(args, cfg)
    failure = None
    if dp.main:
        try:
            cfg = prepare_run_dir(args, cfg)
        except (ValueError, FileNotFoundError, FileExistsError, CheckpointError) as exc:
            failure = exc
    if dp.any(failure is not None, dp.device(args.device)):
        if failure is not None:
            raise failure
        return None
    if not dp.main and args.resume:
        cfg = prepare_run_dir(args, cfg)  # read-only when resuming
    return cfg


if __name__ == "__main__":
    sys.exit(main())
