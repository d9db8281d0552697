"""Dataclass configs and named presets.

One `EngineConfig` holds everything a run needs; it is written to `config.json` in the run
directory and read back by `--resume` and `engine.generate`. CLIs expose the same fields.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class VocabConfig:
    """Layout of the mixed vocabulary: [specials | sentinels | BPE | image codes].

    The paper's 64,512 = 56,320 text ids (specials and sentinels inside) + 8,192 codes.
    """
    text_size: int = 56_320          # specials + sentinels + BPE tokens
    image_codes: int = 8_192
    num_sentinels: int = 16          # <mask:0> .. <mask:15>; CM3 draws at most 16 spans

    @property
    def size(self) -> int:
        return self.text_size + self.image_codes


@dataclass
class ImageConfig:
    """The VQ-VAE image tokenizer: image_size / downsample squared tokens per image."""
    image_size: int = 256
    downsample: int = 16
    channels: int = 128              # width of the conv stacks
    code_dim: int = 64               # dimension of a codebook vector
    train_steps: int = 2_000
    batch_size: int = 64
    lr: float = 2e-3

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid


@dataclass
class ModelConfig:
    """An OPT-like decoder: pre-LayerNorm, GELU MLP, no biases, no dropout."""
    n_layers: int = 32
    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = None    # None = multi-head; fewer = grouped-query attention
    mlp_ratio: float = 4.0
    max_seq_len: int = 4_096
    norm_affine: bool = False        # the paper's LayerNorm has no learnable parameters
    tie_embeddings: bool = True
    init_std: float = 0.02
    # "learned": absolute position embeddings (OPT, the paper); "rope": rotary embeddings on
    # q and k, so attention sees relative offsets (e.g. "one image row up" is the same offset
    # whatever the caption length before the image).
    position: str = "learned"
    rope_theta: float = 10_000.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


SPAN_SEGMENTS = ("uniform", "length")     # TrainConfig.span_segments


@dataclass
class TrainConfig:
    steps: int = 1_000
    batch_size: int = 16             # packed rows of row_tokens (default max_seq_len) tokens
    # Rows per forward/backward (0 = the whole batch): gradients of the batch's micro-batches
    # are summed, each weighted by its share of the batch's targets, so the update is the
    # whole batch's whatever this is; only memory and time change.
    micro_batch_size: int = 0
    # Token slots per packed row; 0 = max_seq_len. A longer row holds more documents (each
    # still at most max_seq_len: positions restart per document), so the padding left at a
    # row's end is a smaller share. On tiny, 1 row of 1,840 slots in place of 8 rows of 256
    # carries the same real tokens a step (12% of the 8x256 slots are padding) with 10% fewer
    # slots to compute and the same loss curve, but held-out-pair colour read 48 / 59% against
    # 62 / 75% (seeds 0 / 1; bench/results/tiny_rows_cpu-epyc-2core.json), so tiny keeps 8x256.
    row_tokens: int = 0
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 1_500
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    cfg_dropout: float = 0.1         # caption replaced by <mask> in training
    max_spans: int = 16              # CM3: n ~ clamp(Poisson(1), 1, max_spans)
    # Which segment a CM3 span falls in: "uniform" over segments or in proportion to its
    # "length" (fewer caption holes). And whether the image right after a caption holding a
    # span is trained (True, plain CM3) or only the context its infill reads (False). The
    # defaults are plain CM3; the tiny preset measured both the other way (engine/data/cm3.py).
    span_segments: str = "uniform"
    image_loss_after_caption_span: bool = True
    checkpoint_every: int = 500
    log_every: int = 10
    # Validation loss (engine/validation.py) every this many steps and at the end; 0 = off.
    eval_every: int = 500
    seed: int = 0
    autocast_bf16: bool = True       # used only where the CPU/GPU supports bf16 well
    ema_decay: float = 0.0           # > 0: keep an EMA of the weights; inference uses it
    # Keep only each block's input and recompute the block in backward (one more forward):
    # activation memory of one block instead of all of them (bench/training_memory.py).
    activation_checkpointing: bool = False

    def __post_init__(self):
        if self.eval_every < 0:
            raise ValueError(f"train.eval_every must be >= 0 (0 = no validation); got "
                             f"{self.eval_every}")
        if self.micro_batch_size < 0:
            raise ValueError(f"train.micro_batch_size must be >= 0 (0 = the whole batch); got "
                             f"{self.micro_batch_size}")
        if self.span_segments not in SPAN_SEGMENTS:
            raise ValueError(f"unknown train.span_segments {self.span_segments!r}; choose one "
                             f"of: {', '.join(SPAN_SEGMENTS)}")


@dataclass
class DataConfig:
    dataset: str = "shapes"
    train_size: int = 40_000         # documents drawn for the training split
    eval_size: int = 512            # documents in each validation set (engine/validation.py)
    bpe_corpus_size: int = 5_000     # captions used to train the BPE
    image_first_prob: float = 0.2    # image-then-caption documents (captioning direction)
    # Documents that are the caption alone (<bos> CM3(caption) <eos>, no image): CM3 infilling
    # practice that trains no image on a holed caption (engine/data/corpus.py).
    caption_only_prob: float = 0.0

    def __post_init__(self):
        for name in ("image_first_prob", "caption_only_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"data.{name} must be in [0, 1], got {p}")


@dataclass
class SampleConfig:
    """Defaults for the sample grid written during training and for engine.generate."""
    cfg_scale: float = 3.0
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0                   # 0 = off


@dataclass
class RetrievalConfig:
    """Retrieval-augmented pretraining (engine/retrieval): a dual encoder, a FAISS memory bank
    over the training corpus, and k neighbours prepended to each training document.

    Off by default: in the ablation (scripts/retrieval_ablation.py, bench/results/
    retrieval_ablation_*.json) it pays at a third of the tiny budget but not at the full one,
    and a step costs ~3x (the neighbours' tokens). A retrieval run needs model.max_seq_len to hold k + 1 documents (tiny: ~240 of
    256 tokens for k = 2, so use 384).
    """
    enabled: bool = False
    k: int = 2                       # retrieved documents per training document
    query_dropout: float = 0.2       # share of the query's tokens dropped when forming it
    dedup_threshold: float = 0.9     # skip candidates scoring above this (near-duplicates)
    candidates: int = 32             # searched per query before the selection rules
    embed_dim: int = 128             # the shared L2-normalised space
    width: int = 128                 # tower width
    text_layers: int = 2
    encoder_steps: int = 800
    encoder_batch: int = 256
    encoder_lr: float = 2e-3
    index: str = "auto"              # flat (exact), ivf, hnsw, or auto (flat up to exact_max)
    exact_max: int = 200_000
    shards: int = 4                  # offline retrieval pass: one shard per worker


SFT_TASKS = ("text_to_image", "caption", "vqa", "edit")


@dataclass
class SFTConfig:
    """Instruction tuning (python -m engine.train --sft-from RUN; engine/data/instructions.py):
    the run it starts from and the share of each task in its stream. An SFT run's `train`
    section is its own schedule (sft_schedule below), not the pretraining one."""
    source_run: str = ""             # "" = a pretraining run
    examples: int = 6_000            # shapes drawn for the instruction set
    text_to_image: float = 0.25
    caption: float = 0.15
    vqa: float = 0.35
    edit: float = 0.25

    def __post_init__(self):
        mix = [getattr(self, t) for t in SFT_TASKS]
        if min(mix) < 0 or sum(mix) <= 0:
            raise ValueError(f"sft task shares must be >= 0 with a positive sum; got "
                             f"{dict(zip(SFT_TASKS, mix))}")
        if self.examples < 1:
            raise ValueError(f"sft.examples must be >= 1, got {self.examples}")


def sft_schedule(pretrain: TrainConfig) -> TrainConfig:
    """The tuning schedule an SFT run starts from: a fifth of the pretraining peak rate after
    a short warmup, a few hundred steps (tiny), and an EMA horizon (~100 steps) short enough
    that the averaged weights are the tuned ones rather than the pretrained ones they start
    from; batch size, seed and the rest as pretraining had them."""
    return dataclasses.replace(pretrain, steps=600, lr=pretrain.lr / 5, warmup_steps=50,
                               checkpoint_every=200,
                               ema_decay=0.99 if pretrain.ema_decay > 0 else 0.0)


@dataclass
class EngineConfig:
    preset: str = "tiny"
    vocab: VocabConfig = field(default_factory=VocabConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict) -> "EngineConfig":
        parts = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in d.items():
            if name not in parts:
                raise ValueError(f"unknown config section {name!r}")
            sub = _SECTIONS.get(name)
            if sub is None:
                kwargs[name] = value
                continue
            known = {f.name for f in dataclasses.fields(sub)}
            unknown = set(value) - known
            if unknown:
                raise ValueError(f"unknown fields in config.{name}: {sorted(unknown)}")
            if "betas" in value:
                value = {**value, "betas": tuple(value["betas"])}
            kwargs[name] = sub(**value)
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path) -> "EngineConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


_SECTIONS = {"vocab": VocabConfig, "image": ImageConfig, "model": ModelConfig,
             "train": TrainConfig, "data": DataConfig, "sample": SampleConfig,
             "retrieval": RetrievalConfig, "sft": SFTConfig}


def _tiny() -> EngineConfig:
    # CPU-sized: 32x32 images as 8x8 = 64 codes from a 512-entry codebook, ~3.5M parameters.
    # Measured on the 2-core AMD EPYC dev machine (bench/results/tiny_default_run_*.json):
    # rotary positions beat learned ones (an image row is always 8 tokens up, whatever the
    # caption length); 8-row batches with twice the updates beat 16-row ones at equal tokens;
    # 2,600 steps (~5.3M tokens at ~9-10k tokens/s with the C++ attention): the whole default
    # run took 14 min 16 s, 14 min 33 s and 15 min 26 s from fresh clones at 97bad18..88d0580
    # (same results; the last on a slow phase of the machine), and 14 min 8 s at 46767e6 (a
    # faster native build): no safe margin under 15 minutes. More steps would not buy
    # held-out-pair colour: 4,400 (1.7x the tokens, what the issue's ~17k tokens/s trial
    # machine trains in that time) read 70 / 76 / 48% against 62 / 75 / 62% (seeds 0 / 1 / 2;
    # bench/results/tiny_caption_order_decay_compute_*.json); only trained pairs gained.
    return EngineConfig(
        preset="tiny",
        vocab=VocabConfig(text_size=1_024, image_codes=512),
        # VQ-VAE (engine.eval.vq_report, 8-colour shapes, heldout split; "vq_reports" in
        # bench/results/tiny_recipe_colours_*.json): 1,000 steps reached 29.2 dB PSNR and 85%
        # codebook use, 1,500 steps 34.0 dB and 91%, in ~3 minutes on 2 CPU cores (bf16).
        # Fewer steps are not a free time saving: at 1,250 steps (33.1 dB, 99% of the codes in
        # use) the model trained on its codes ended at loss 0.84 against 0.66 and drew the asked
        # colour for held-out pairs 30 / 41% of the time (seeds 0 / 1). 256 codes reach only
        # 27.4 dB (bench/results/tiny_embedding_init_and_vq_variants_*.json).
        image=ImageConfig(image_size=32, downsample=4, channels=64, code_dim=32,
                          train_steps=1_500, batch_size=64, lr=2e-3),
        model=ModelConfig(n_layers=4, d_model=256, n_heads=4, max_seq_len=256, position="rope"),
        # The EMA of the weights is what inference uses. Decay 0.999 (horizon ~1,000 steps):
        # held-out-pair colour swings by up to 23 points between checkpoints 400 steps apart;
        # against 0.998 (post hoc from 100-step checkpoints, 12 runs) the longer average raised
        # it in 10 (+6 points on average), kept trained-pair colour level (+0.3) and cost 2
        # points of trained-pair colour+shape (bench/results/tiny_weight_average_* and
        # tiny_partial_captions_*).
        # Where CM3 puts its spans (engine/data/cm3.py; bench/results/tiny_span_placement_*):
        # spans in proportion to segment length, no loss on an image after a holed caption, and
        # 1 document in 5 the caption alone. Against plain CM3 (uniform, loss everywhere),
        # seeds 0-3: held-out-pair colour at CFG 3 77/83/81/84% against 62/75/62/62%,
        # trained-pair colour+shape 91% against 85% on average, caption infilling 58% against
        # 78% (chance 18%).
        train=TrainConfig(steps=2_600, batch_size=8, lr=1.5e-3, warmup_steps=200,
                          checkpoint_every=650, weight_decay=0.05, ema_decay=0.999,
                          span_segments="length", image_loss_after_caption_span=False),
        # 256 validation documents a set: the six readings of both sets added ~13 s to the
        # model stage (536 against 523 s, fresh clones at 0cd47c4 and 3178d64)
        data=DataConfig(train_size=60_000, caption_only_prob=0.2, eval_size=256),
    )


def _small() -> EngineConfig:
    cfg = _tiny()
    cfg.preset = "small"
    cfg.vocab = VocabConfig(text_size=4_096, image_codes=1_024)
    cfg.image = ImageConfig(image_size=64, downsample=8, channels=96, code_dim=32,
                            train_steps=3_000)
    cfg.model = ModelConfig(n_layers=8, d_model=512, n_heads=8, max_seq_len=512, position="rope")
    cfg.train = TrainConfig(steps=5_000, batch_size=16, lr=1e-3, warmup_steps=300,
                            span_segments="length", image_loss_after_caption_span=False)
    return cfg


def _paper(name: str, n_layers: int, d_model: int, n_heads: int,
           activation_checkpointing: bool = False) -> EngineConfig:
    return EngineConfig(
        preset=name,
        vocab=VocabConfig(),
        image=ImageConfig(image_size=256, downsample=16),
        model=ModelConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, max_seq_len=4_096),
        train=TrainConfig(lr=1e-4, warmup_steps=1_500, batch_size=8,
                          activation_checkpointing=activation_checkpointing),
    )


PRESETS = {
    "tiny": _tiny,
    "small": _small,
    "cm3leon-350m": lambda: _paper("cm3leon-350m", 24, 1024, 16),
    "cm3leon-760m": lambda: _paper("cm3leon-760m", 24, 1536, 24),
    # 8 x 4,096 tokens through 32 blocks of d=4,096 keep ~150 GB of activations (~34 bytes a
    # token per unit of width and layer, flash attention's count); keeping only the blocks'
    # fp32 inputs (17 GB) and one block's activations (~5 GB) leaves room beside the weights,
    # gradients and AdamW state (16 bytes a parameter, ~112 GB) on one 141 GB H200.
    "cm3leon-7b": lambda: _paper("cm3leon-7b", 32, 4096, 32, activation_checkpointing=True),
}


def get_preset(name: str) -> EngineConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()
