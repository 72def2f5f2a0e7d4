"""The typed schema of ``params.yaml``: the one file a user edits.

Every stage validates the whole file before doing any work, so a typo in the ``report``
section fails ``preprocess`` at once instead of an hour later. Unknown keys are errors (a
misspelt knob silently falling back to its default is the worst kind of bug in an ablation),
and so is the legacy ``coord_loss`` block of the v1 recipe, wherever it appears.

Each field's docstring is its documentation; ``coordexp check-config`` prints errors as
``key.path: what is wrong; what to write instead``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from coordexp.core import paths
from coordexp.core.errors import UserError


class ConfigError(UserError, ValueError):
    """A ``params.yaml`` problem; the message names the key path and says what to write instead."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


# --------------------------------------------------------------------------------------------
# preprocess


class SplitSource(_Section):
    annotations: str
    """COCO instances JSON of the split (relative to the project root or absolute)."""
    images: str
    """Folder that the COCO ``file_name`` entries are relative to."""


class PreprocessConfig(_Section):
    splits: dict[str, SplitSource] = Field(
        default_factory=lambda: {
            "train": SplitSource(
                annotations="data/shapes/annotations/instances_train.json", images="data/shapes/train"
            ),
            "val": SplitSource(annotations="data/shapes/annotations/instances_val.json", images="data/shapes/val"),
        }
    )
    """COCO-format inputs by split name; ``train`` and ``val`` are required."""
    out_dir: str = "artifacts/preprocess"
    """Where the contract JSONL files (``<split>.jsonl``), images and rejects are written."""
    max_side: int | None = Field(default=None, ge=32)
    """Resize images so that their longer side is at most this many pixels (coordinates are
    rescaled); ``null`` keeps the original size."""
    object_ordering: Literal["sorted", "random"] = "sorted"
    """``sorted``: objects by top-left corner (y1, then x1, then desc); ``random``: shuffled with a
    per-sample seed (ablation)."""
    vertex_order: Literal["canonical", "source"] = "canonical"
    """Point order of polygons and lines: ``canonical`` (polygons clockwise from the top-most
    vertex, lines from their top-most end; see ``preprocess.canonical_points``) or as the source
    lists them."""
    rle: Literal["bbox", "reject"] = "bbox"
    """What to do with an RLE segmentation: keep the object as its box, or reject it."""
    min_box_side: float = Field(default=1.0, gt=0)
    """Boxes narrower or shorter than this (pixels) are degenerate and rejected."""
    border_tolerance: float = Field(default=1.0, ge=0)
    """Pixels a coordinate may lie past the image border and still be kept: it is clamped onto the border and
    the object counted (``border_clamped``). Real exports put edges a fraction of a pixel past the border
    through float rounding; an object further out is rejected as ``outside_image``."""
    polygon_parts: Literal["box", "largest", "reject"] = "box"
    """What a polygon annotation of several parts becomes. ``box`` (the default): a ``bbox_2d`` over every
    part, the annotation's own extent, so the ground truth the evaluation scores against is never smaller than
    the object (bbox AP is the headline metric); ``largest``: its largest part as a ``poly``, which keeps a
    shape to learn but can shrink the extent (counted as ``polygon_parts_shrunk``); ``reject``: the object is
    rejected (``multi_part_polygon``). Multi-part polygons are counted (``multi_part_polygons``) whatever this is."""

    @model_validator(mode="after")
    def _needs_train_and_val(self) -> PreprocessConfig:
        missing = {"train", "val"} - set(self.splits)
        if missing:
            raise ValueError(f"splits must define {sorted(missing)} (each with annotations and images)")
        return self


# --------------------------------------------------------------------------------------------
# build_base


class VisionWarmupConfig(_Section):
    """Dense warm-up of the tiny model's vision tower before Stage-1 (:mod:`coordexp.build_base.vision_warmup`):
    a stand-in for the pretrained vision encoder a real checkpoint brings."""

    steps: int = Field(default=1500, ge=0)
    """Optimizer steps (0: keep the random vision tower)."""
    batch_size: int = Field(default=32, ge=1)
    """Images per step."""
    learning_rate: float = Field(default=2.0e-3, gt=0)
    """Peak AdamW learning rate (20-step warm-up, cosine decay to 55%)."""


class TinyModelConfig(_Section):
    vocab_size: int = Field(default=1024, ge=300, le=65536)
    """Byte-level BPE vocabulary trained on the train descriptions and answers (before the
    special and coord tokens are added)."""
    hidden_size: int = Field(default=128, ge=16)
    """Text decoder width."""
    num_layers: int = Field(default=4, ge=1)
    """Text decoder layers."""
    num_heads: int = Field(default=4, ge=1)
    """Attention heads of the text decoder."""
    num_kv_heads: int = Field(default=2, ge=1)
    """Key/value heads (grouped-query attention)."""
    intermediate_size: int = Field(default=384, ge=16)
    """MLP width of the text decoder."""
    vision_hidden_size: int = Field(default=64, ge=16)
    """Vision encoder width."""
    vision_depth: int = Field(default=2, ge=1)
    """Vision encoder blocks."""
    vision_heads: int = Field(default=4, ge=1)
    """Vision encoder attention heads."""
    patch_size: int = Field(default=8, ge=2)
    """Vision patch side in pixels (2x2 patches merge into one visual token)."""
    grammar_tokens: bool = True
    """Keep the answer grammar's fixed strings (``", "`` between coords, ``": {"desc": "``, ...) and
    the prompt whole, as added tokens: the sequence is a third shorter and every token left is one
    the model has to choose (bench/RESULTS.md, ``## embedded_default``). False: plain BPE pieces."""
    coord_init: Literal["random", "ordinal"] = "ordinal"
    """Initial embedding rows of the coord tokens (tied with the output rows): ``random`` like every
    other row, or ``ordinal``, a smooth code of the bin index at the same scale
    (:func:`coordexp.build_base.expand.ordinal_code`), so neighbouring bins start close, on the input side (the
    decoder reads earlier coords as numbers) and on the output side (a logit peak is smooth in the bin)."""
    seed: int = 0
    """Seed of the random initialisation, of the tokenizer training and of the vision warm-up."""
    vision_warmup: VisionWarmupConfig = Field(default_factory=VisionWarmupConfig)
    """Warm-up of the vision tower on the training split's boxes (see ``VisionWarmupConfig``)."""


class ExpandConfig(_Section):
    source: str | None = None
    """Local Qwen3-VL or Qwen2.5-VL checkpoint directory to extend with the coord tokens."""
    init: Literal["mean", "ordinal"] = "mean"
    """Initial embedding rows of the new tokens: the mean of existing rows, or the mean plus a
    small smooth code of the bin index so that neighbouring bins start close."""
    ordinal_scale: float = Field(default=0.02, ge=0)
    """Size of the ordinal code relative to the embedding rows' standard deviation."""


class BuildBaseConfig(_Section):
    mode: Literal["tiny", "expand"] = "tiny"
    """``tiny``: build a small random Qwen3-VL-architecture model here; ``expand``: add the coord
    tokens to ``expand.source``."""
    out_dir: str = "artifacts/base"
    """Where the base checkpoint and its ``coord_vocab.json`` are written."""
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    """Dimensions of the tiny model (mode tiny)."""
    expand: ExpandConfig = Field(default_factory=ExpandConfig)
    """Checkpoint to expand (mode expand)."""

    @model_validator(mode="after")
    def _expand_needs_source(self) -> BuildBaseConfig:
        if self.mode == "expand" and not self.expand.source:
            raise ValueError(
                "mode is 'expand' but expand.source is not set: set build_base.expand.source to a local "
                "Qwen3-VL / Qwen2.5-VL checkpoint directory"
            )
        return self


# --------------------------------------------------------------------------------------------
# train


class CoordSoftCEW1Config(_Section):
    """The Stage-1 loss (formulas in :mod:`coordexp.train.loss`): softCE + W1 + gate on coord tokens, masked CE
    elsewhere. The defaults are the method's."""

    enabled: bool = True
    """``false`` trains plain full-vocabulary CE on every token, coord tokens included (baseline)."""
    soft_ce_weight: float = Field(default=1.0, ge=0)
    """lambda_ce: weight of the soft cross-entropy against the Gaussian target."""
    w1_weight: float = Field(default=1.0, ge=0)
    """lambda_w1: weight of the 1-D Wasserstein-1 distance (CDF form, divided by K - 1)."""
    gate_weight: float = Field(default=1.0, ge=0)
    """lambda_gate: weight of -log(coord-vocab mass) at coord positions."""
    text_gate_weight: float = Field(default=0.0, ge=0)
    """Weight of -log(1 - coord-vocab mass of softmax(z / T)) at text positions, a mean over the text
    tokens (0: off, the spec's loss). The original CoordExp recipe penalises coord mass where text is
    due, the mirror image of the gate; costs one more pass over the vocabulary per text row."""
    coord_ce_weight: float = Field(default=0.0, ge=0)
    """Weight of the hard full-vocabulary CE (T = 1) at coord positions, a mean over the coord tokens
    (0: off, the spec's loss). Some recipes mix it back in beside the distribution losses; at T != 1
    it costs one more pass over the vocabulary per coord row."""
    temperature: float = Field(default=1.0, gt=0)
    """T: coord distributions are softmax(s / T); the gate uses z / T too."""
    target_sigma: float = Field(default=2.0, gt=0)
    """Standard deviation, in bins, of the Gaussian soft target."""
    target_truncate: int = Field(default=16, ge=0, le=999)
    """Radius, in bins, beyond which the soft target is zero (0 gives a one-hot target)."""


class TokenTypeMetricsConfig(_Section):
    enabled: bool = False
    """Log loss and accuracy per token type (description, structure, coord)."""


class FreezeConfig(_Section):
    """Which parts of the model full training leaves as built (ms-swift ``--freeze_vit`` / ``--freeze_aligner`` /
    ``--freeze_llm``). The 1000 coord rows of the input embeddings and of the output head train whatever these
    say: they are what a base checkpoint with new coord tokens has not learnt yet."""

    vit: bool = False
    """Freeze the vision tower: a pretrained encoder keeps what it already sees, and its gradients and optimizer
    state cost nothing."""
    aligner: bool = False
    """Freeze the merger that maps visual tokens into the decoder (and its deepstack mergers)."""
    llm: bool = False
    """Freeze the decoder and its LM head, all but their coord rows: the original vocabulary rows stay
    bit-identical to the base while the coord rows learn (the trainer zeroes the other rows' gradients), so the
    model keeps its text abilities and learns only to place coordinates."""


class LoraConfig(_Section):
    """LoRA through ms-swift (``--tuner_type lora``, peft): low-rank adapters on the linear layers of the parts
    switched in, the coord rows of the embeddings and head trained beside them, everything else frozen; the
    stage merges the adapters into a standalone checkpoint at the end."""

    rank: int = Field(default=8, ge=1)
    """Rank of each adapter (``--lora_rank``): its capacity, and its parameter count, grow with it."""
    alpha: float = Field(default=32.0, gt=0)
    """Scale numerator (``--lora_alpha``): an adapter's update is multiplied by ``alpha / rank``."""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the adapters' inputs (``--lora_dropout``), a regulariser for small data."""
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"], min_length=1)
    """Which layers get adapters (``--target_modules``): ``all-linear`` is every linear layer of the parts switched
    in below (the LM head excluded), or module names such as ``q_proj``, ``v_proj``."""
    vit: bool = False
    """Adapt the vision tower (ms-swift's ``--freeze_vit false``); off, it stays as built, the usual choice for a
    pretrained encoder."""
    aligner: bool = False
    """Adapt the merger that maps visual tokens into the decoder (``--freeze_aligner false``)."""
    llm: bool = True
    """Adapt the decoder (``--freeze_llm false``): where the model learns to write the answers."""


class TrainConfig(_Section):
    out_dir: str = "artifacts/train"
    """ms-swift output folder: checkpoints and logs."""
    max_steps: int = Field(default=2000, ge=1)
    """Optimizer steps."""
    learning_rate: float = Field(default=1e-3, gt=0)
    """Peak learning rate (AdamW)."""
    vit_lr: float | None = Field(default=None, ge=0)
    """Peak learning rate of the vision tower (ms-swift ``--vit_lr``); null: ``learning_rate``. A
    smaller one keeps what a pretrained (or warmed-up) encoder already sees while the decoder learns."""
    aligner_lr: float | None = Field(default=None, ge=0)
    """Peak learning rate of the merger that maps visual tokens into the decoder (``--aligner_lr``);
    null: ``learning_rate``."""
    lr_scheduler_type: str = "cosine"
    """Any transformers scheduler name (cosine, linear, constant, ...)."""
    warmup_ratio: float = Field(default=0.05, ge=0, le=1)
    """Fraction of the steps spent warming the learning rate up."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    per_device_train_batch_size: int = Field(default=8, ge=1)
    """Samples per device per micro-batch."""
    per_device_eval_batch_size: int = Field(default=8, ge=1)
    """Samples per device per evaluation batch."""
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step (losses are token means over all of them)."""
    logging_steps: int = Field(default=50, ge=1)
    """Log train metrics every this many steps."""
    eval_steps: int = Field(default=500, ge=1)
    """Evaluate (teacher-forced losses and metrics on val) every this many steps."""
    eval_samples: int | None = Field(default=64, ge=1)
    """Teacher-forced evaluation uses the first N val samples (``null``: all of them)."""
    save_steps: int = Field(default=500, ge=1)
    """Save a checkpoint every this many steps."""
    save_total_limit: int | None = Field(default=None, ge=1)
    """Keep at most this many checkpoints (``null``: all)."""
    max_length: int = Field(default=512, ge=16)
    """Longest tokenised sample; longer ones are rejected and counted, not truncated."""
    seed: int = 0
    """Seed of the trainer (initial data order, dropout)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Model dtype; the loss is computed in fp32 whatever this is."""
    nproc_per_node: int = Field(default=1, ge=1)
    """GPUs per node; more than one launches through ms-swift's torchrun path."""
    nnodes: int = Field(default=1, ge=1)
    """Machines of one training run (torchrun ``--nnodes``); every node runs the ``train`` stage with the same
    params, ``nproc_per_node`` processes each. The ``NNODES`` environment variable fills it in when left at 1."""
    node_rank: int = Field(default=0, ge=0)
    """This machine's place among ``nnodes`` (0 .. nnodes - 1). Node 0 writes the pipeline's outputs and the
    MLflow run; the others only train. ``NODE_RANK`` fills it in when left at 0, so every node can share one
    ``params.yaml``."""
    master_addr: str | None = None
    """Address of node 0 that every node reaches (torchrun ``--master_addr``); null: ``MASTER_ADDR``, else
    127.0.0.1 on one node. Needed for ``nnodes > 1``."""
    master_port: int | None = Field(default=None, ge=1, le=65535)
    """Port of node 0 for the rendezvous (torchrun ``--master_port``); null: ``MASTER_PORT``, else a free port on
    one node (two runs side by side must not collide) and torchrun's 29500 on several."""
    deepspeed: Literal["zero0", "zero1", "zero2", "zero3"] | None = None
    """DeepSpeed ZeRO stage through ms-swift (GPU only)."""
    packing: bool = False
    """ms-swift packing (needs flash-attention, so a GPU); refused on the CPU."""
    fused_loss: bool = False
    """Compute the Stage-1 loss from the last hidden states through the LM head in chunks
    (``coordexp.train.fused_loss``): the model returns logits for one position only and the ``[N, V]``
    logits never exist. Same loss and gradients as ``false`` (tested). Turn it on when the logits
    dominate memory (a real checkpoint with V ~ 152k); its cost on the CPU is in bench/RESULTS.md
    (``## fused_loss``)."""
    coord_diag: bool = True
    """Log coord-distribution diagnostics at coord positions, train and eval, under ``coord_diag/``: top-1 and
    top-5 bin accuracy, accuracy within +-2 bins, mean probability of the target bin, mean absolute error of the
    expected bin, mean spread (std in bins) of softmax(s / T) (:func:`coordexp.train.loss.coord_diagnostics`).
    They show whether the coord heads learn where the loss terms cannot (a soft CE can fall while the arg-max
    stays put); computed from the coord slice the loss already has, no gradient, the loss unchanged; under 2%
    of the loss's own time, ~0.3% of a step (bench/RESULTS.md, ``## coord_diag_overhead``). ``false`` skips them."""
    dataloader_num_workers: int = Field(default=0, ge=0)
    """Background data-loading processes."""
    coord_soft_ce_w1: CoordSoftCEW1Config = Field(default_factory=CoordSoftCEW1Config)
    """The Stage-1 loss block."""
    token_type_metrics: TokenTypeMetricsConfig = Field(default_factory=TokenTypeMetricsConfig)
    """Per-token-type loss and accuracy."""
    swift_plugins: list[str] = Field(default_factory=list)
    """Extra ms-swift plugin files (``--external_plugins``), imported after the project's own in every
    training process: your callbacks, metrics or loss wrappers. Paths relative to the project root."""
    log_checkpoint: Literal["reference", "full"] = "reference"
    """Log the final checkpoint to MLflow as a path reference (tag) or upload it as artifacts."""
    tuner: Literal["full", "lora"] = "full"
    """``full``: every weight of the parts not frozen (``freeze``) trains; ``lora``: adapters (``lora``) on a
    frozen model, merged into a standalone checkpoint at the end, a fraction of the trainable parameters and
    optimizer memory. Either way the coord rows of the embeddings and head train."""
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    """Parts of the model that full training leaves as built."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """The adapters of ``tuner: lora``."""

    @property
    def coord_rows_only(self) -> bool:
        """Whether the input embeddings and the LM head train their coord rows alone (the decoder is frozen or
        adapted), so that the trainer masks their gradients to those rows."""
        return self.tuner == "lora" or self.freeze.llm

    @property
    def frozen(self) -> FreezeConfig:
        """The parts ms-swift leaves as built (``--freeze_*``): ``freeze`` for full training; the parts not
        adapted for LoRA (ms-swift picks the adapters' target layers from the same switches)."""
        if self.tuner == "lora":
            return FreezeConfig(vit=not self.lora.vit, aligner=not self.lora.aligner, llm=not self.lora.llm)
        return self.freeze

    @model_validator(mode="after")
    def _something_trains(self) -> TrainConfig:
        f = self.freeze
        if self.tuner == "lora" and (f.vit or f.aligner or f.llm):
            raise ValueError(
                "freeze: train.freeze applies to full training; with train.tuner: lora choose the adapted parts "
                "with train.lora.vit / train.lora.aligner / train.lora.llm and leave train.freeze all false"
            )
        if self.tuner == "lora" and not (self.lora.vit or self.lora.aligner or self.lora.llm):
            raise ValueError(
                "lora: vit, aligner and llm all false adapt nothing: set at least one of "
                "train.lora.vit / train.lora.aligner / train.lora.llm to true"
            )
        if f.vit and f.aligner and f.llm:
            raise ValueError(
                "freeze: vit, aligner and llm all true freeze the whole model: set at least one of "
                "train.freeze.vit / train.freeze.aligner / train.freeze.llm to false"
            )
        if self.coord_rows_only and self.weight_decay > 0:
            why = "train.tuner: lora" if self.tuner == "lora" else "train.freeze.llm: true"
            undo = "train.tuner: full" if self.tuner == "lora" else "train.freeze.llm: false"
            raise ValueError(
                f"weight_decay: {self.weight_decay} with {why} would move the frozen vocabulary rows of the "
                f"embeddings and LM head (AdamW decays every row, gradient or not): set train.weight_decay: 0 "
                f"or {undo}"
            )
        return self

    @model_validator(mode="after")
    def _node_rank_in_range(self) -> TrainConfig:
        if self.nnodes > 1 and self.node_rank >= self.nnodes:
            raise ValueError(
                f"node_rank: {self.node_rank} is not a node of nnodes: {self.nnodes}: set train.node_rank to "
                f"0 .. {self.nnodes - 1} (0 on the node at train.master_addr)"
            )
        return self

    @model_validator(mode="after")
    def _fused_needs_stage1(self) -> TrainConfig:
        if self.fused_loss and not self.coord_soft_ce_w1.enabled:
            raise ValueError(
                "fused_loss: true computes the Stage-1 loss; the plain-CE baseline (coord_soft_ce_w1.enabled: "
                "false) runs on materialised logits: set train.fused_loss: false for the baseline"
            )
        if self.fused_loss and self.token_type_metrics.enabled:
            raise ValueError(
                "token_type_metrics.enabled: true needs the full logits, which fused_loss: true never builds: "
                "turn one of them off"
            )
        return self


# --------------------------------------------------------------------------------------------
# evaluate / report / tracking


class EvaluateConfig(_Section):
    out_dir: str = "artifacts/eval"
    """Where predictions and COCO files are written."""
    checkpoints: Literal["last", "all"] = "last"
    """Evaluate the final checkpoint, or every saved one and pick the best by bbox mAP."""
    batch_size: int = Field(default=16, ge=1)
    """Images per generation batch."""
    max_new_tokens: int = Field(default=256, ge=8)
    """Longest generated answer; a longer one is truncated and salvaged by the parser."""
    split: str = "val"
    """Which preprocessed split to evaluate."""
    limit: int | None = Field(default=None, ge=1)
    """Evaluate only the first N records (``null``: all)."""
    metrics: Literal["coco", "lvis"] = "coco"
    """``coco``: COCO mAP (pycocotools) and the rest of ``eval.json``. ``lvis``: besides those, the LVIS federated
    protocol through the ``lvis`` package (bbox: ``lvis_AP``, ``lvis_AP50``, ``lvis_AP75``, ``lvis_APs/m/l``,
    ``lvis_APr/c/f``, ``lvis_AR``; at most 300 detections per image; a detection of a category neither present
    nor checked absent in its image is not scored), from the ``<split>.lvis.json`` that ``preprocess`` writes for
    an LVIS split (:func:`coordexp.evaluate.metrics.lvis_map`). The COCO ``bbox_mAP`` still picks the checkpoint."""
    readout: Literal["argmax", "expectation", "median", "local_expectation"] = "median"
    """How each coordinate is read from the coord distribution at its slot (:mod:`coordexp.evaluate.readout`) for
    the headline metrics, ``predict`` and the MLflow model: the emitted ``argmax`` bin, the ``expectation``, the
    ``median`` (first bin whose CDF reaches 0.5) or the ``local_expectation`` (within ``local_window`` bins of
    the arg-max). Every readout is measured anyway (``eval.json`` ``readouts``) from the one generation; the
    median is the default because it measured best on the default Stage-1 checkpoint (mAP50 0.457 against
    0.448 for the arg-max) and, unlike the expectation, a far tail does not drag it."""
    local_window: int = Field(default=8, ge=0, le=999)
    """Half-width in bins of the ``local_expectation`` readout: wide enough for the Stage-1 target's mass
    (sigma 2 bins), narrow enough to ignore a second mode."""
    score: Literal["coord_geomean", "coord_mass", "coord_peak", "neg_spread", "desc_coord_geomean"] = (
        "desc_coord_geomean"
    )
    """The object score that ranks detections for the headline AP and that ``predict`` reports
    (:data:`coordexp.evaluate.scoring.SCORES`); every definition's AP is in ``eval.json`` ``scores``. The default
    also counts the description tokens' probabilities, the model's confidence in the class, beside the coords':
    on the embedded default it ranked best of the five for Stage-1 and for the CE baseline alike (bench/RESULTS.md,
    ``## readouts_vs_loss``)."""
    calibration_bins: int = Field(default=10, ge=2, le=100)
    """Equal-width score bins of the reliability diagram and the expected calibration error of the headline
    score (:mod:`coordexp.evaluate.calibration`)."""
    calibration_fit: Literal["none", "temperature", "isotonic"] = "isotonic"
    """A calibration map fitted on one half of the evaluation images and reported on the other (never on what it
    fitted): ``isotonic`` (monotone, no shape assumed), ``temperature`` (one scalar on the score's logit) or
    ``none``; ``eval.json`` ``calibration.ece_fitted`` is its held-out ECE."""
    log_model: Literal["reference", "copy", "none"] = "reference"
    """How the evaluated checkpoint (the final one, or the best by bbox mAP) is logged as the run's MLflow
    pyfunc model ``model`` (:mod:`coordexp.evaluate.mlflow_model`): ``reference`` stores a small file naming the
    checkpoint folder relative to the repository, with its files' MD5s, and loads from there (free, so the
    default pipeline stays fast; the model serves only where that checkpoint is checked out, from the
    repository or the DVC cache); ``copy`` puts the checkpoint's inference files inside the model's artifacts
    (self-contained, costs the checkpoint's size); ``none`` logs no model."""
    registered_model: str | None = "{experiment}"
    """Model-registry name the logged model is registered under, as a new version tagged with the evaluation
    metrics; ``{experiment}`` is replaced by ``tracking.experiment``. ``null``: logged, not registered."""
    decoding: Literal["constrained", "free"] = "constrained"
    """``constrained``: a logits processor (:mod:`coordexp.evaluate.grammar`) lets the model write only answers the
    parser accepts (keys numbered from 1, one geometry per object, coord tokens exactly in coord slots, valid
    coord counts, closed before ``max_new_tokens``), so a parse failure never costs a detection; ``free``: plain
    greedy decoding, to measure what the model writes unaided. Also the MLflow model's decoding."""
    descriptions: Literal["free", "train_set"] = "free"
    """Descriptions under constrained decoding: ``free`` text (no quote, backslash or control character), or
    only the descriptions seen in the train split (``train_set``: a closed vocabulary, as COCO/LVIS classes are)."""
    max_objects: int = Field(default=100, ge=1)
    """Constrained decoding: most objects in one answer (then the answer closes)."""
    max_poly_points: int = Field(default=64, ge=3)
    """Constrained decoding: most (x, y) points of a ``poly`` (a polygon needs at least 3)."""
    max_line_points: int = Field(default=64, ge=2)
    """Constrained decoding: most (x, y) points of a ``line`` (a line needs at least 2)."""


class ReportConfig(_Section):
    out_dir: str = "reports"
    """Where rendered notebooks, HTML and figures go."""


class TrackingConfig(_Section):
    experiment: str = "coordexp-stage1"
    """MLflow experiment name."""
    uri: str | None = None
    """Tracking URI; ``null`` means ``sqlite:///<project root>/mlflow.db``. The environment
    variable ``MLFLOW_TRACKING_URI`` overrides both."""
    artifact_location: str | None = None
    """Artifact root for a new experiment; ``null`` means ``<project root>/mlartifacts``, which a copied
    repository's store follows to the copy (``coordexp.pipeline.tracking``)."""
    outage_limit_s: int = Field(default=300, ge=0, le=1080)
    """Seconds an HTTP tracking server may stay away during training before the train stage saves a
    checkpoint and stops, saying how to resume into the same run. Shorter outages (a server restart) only
    pause training while MLflow's client retries; 300 s rides out a restart or redeploy without leaving a
    GPU idle for long. At most 1080: MLflow's client retries 10 times, each wait at most 120 s."""


class Params(_Section):
    """The whole ``params.yaml``."""

    seed: int = 0
    """Global seed (data order, sampling); stages derive theirs from it unless they set one."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Where MLflow runs go."""
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    """COCO inputs -> contract JSONL."""
    build_base: BuildBaseConfig = Field(default_factory=BuildBaseConfig)
    """The base checkpoint with coord tokens."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Stage-1 training through ms-swift."""
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    """Offline detection evaluation."""
    report: ReportConfig = Field(default_factory=ReportConfig)
    """papermill reports and figures."""

    @model_validator(mode="after")
    def _lora_evaluates_the_merge(self) -> Params:
        if self.train.tuner == "lora" and self.evaluate.checkpoints == "all":
            raise ValueError(
                "evaluate.checkpoints: all reads every ms-swift checkpoint, and with train.tuner: lora those are "
                "adapters; only artifacts/train/final is merged into a model: set evaluate.checkpoints: last "
                "or train.tuner: full"
            )
        return self


# --------------------------------------------------------------------------------------------
# loading and error messages

_LEGACY_KEYS = {
    "coord_loss": (
        "the legacy v1 'coord_loss' block was removed; configure the Stage-1 loss in "
        "train.coord_soft_ce_w1 {enabled, soft_ce_weight, w1_weight, gate_weight, text_gate_weight, "
        "coord_ce_weight, temperature, target_sigma, target_truncate}"
    ),
}


def _find_legacy(node: Any, path: tuple[str, ...] = ()) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            here = (*path, str(key))
            if key in _LEGACY_KEYS:
                found.append(f"{'.'.join(here)}: {_LEGACY_KEYS[key]}")
            found.extend(_find_legacy(value, here))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.extend(_find_legacy(value, (*path, str(i))))
    return found


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The schema class that owns the field at ``loc`` (for listing the allowed keys)."""
    model: Any = Params
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return None
        if part in fields:
            ann = fields[part].annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            if model is None:
                args = getattr(ann, "__args__", ())
                model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        elif model is PreprocessConfig or getattr(model, "__name__", "") == "SplitSource":
            model = SplitSource
        else:
            return None
    return model


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        owner = _model_at(loc[:-1])
        allowed = sorted(owner.model_fields) if owner else []
        key_name = str(loc[-1])
        close = difflib.get_close_matches(key_name, allowed, n=1) or [a for a in allowed if key_name in a][:1]
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{key}: unknown key; {hint}allowed keys here: {', '.join(allowed)}"
    got = error.get("input")
    got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{key}: {error['msg']}{got_txt}"


def validate_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate an already-parsed params mapping; raise :class:`ConfigError` naming every bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    problems = _find_legacy(raw)
    if not problems:
        try:
            return Params.model_validate(raw)
        except ValidationError as exc:
            problems = [_describe(e) for e in exc.errors()]
    raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(f"  {p}" for p in problems))


def load_params(path: str | Path | None = None) -> Params:
    """Read and validate ``params.yaml`` (default: the project's own)."""
    file = Path(path) if path is not None else paths.params_file()
    if not file.is_file():
        raise ConfigError(f"{file}: no such params file; copy params.yaml from the repository root")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{file}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return validate_params(raw, source=str(file))


def override_params_file(path: str | Path, updates: dict[str, Any]) -> None:
    """Set ``dotted.key: value`` entries in a params file in place (experiment copies, tests, benches).

    Not validated here on purpose: a stage validates the file before it does any work, so a
    wrong key still fails with the schema's message, where a user would meet it."""
    file = Path(path)
    raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    for dotted, value in updates.items():
        node = raw
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    file.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
