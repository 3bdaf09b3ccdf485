"""The DiT paper's architecture: a class-conditional image model (label embedding with a null
class, absolute 2D sin-cos positions, no QK-norm, learned sigma, no captions or
cross-attention), trained here with rectified flow on the synthetic clips' frames, the shape
as the class. What `python -m jaxsora.export export-dit --format diffusers` exports to
diffusers' DiTTransformer2DModel, and what `import-dit` of a diffusers DiT builds on.

    python -m jaxsora.train --config experiments/dit_image.py --workdir runs/dit_image

Variants (comma-separated after a colon): runlocal (a few steps of a smaller model, for tests),
steps=N.
"""

from experiments import tiny
from jaxsora.models.dit import original_dit_fields

SHAPES = ("circle", "square", "diamond", "triangle", "cross")  # data_pipelines/synthetic_clips


def get_config(arg: str | None = None):
    args = tiny.parse_arg(arg)
    c = tiny.get_config(arg)
    if "steps" not in args and "runlocal" not in args:
        c.total_steps = 1000
    # positions, qk_norm, learn_sigma, mlp_ratio, and diffusers' timestep frequencies
    # (time_freq_shift=1; 0 would be the DiT paper's code, which diffusers cannot reproduce), so
    # the model exports to diffusers exactly. The class count comes from text.class_names.
    for field, value in original_dit_fields(num_classes=len(SHAPES)).items():
        if field != "num_classes":
            c.model[field] = value
    c.model.text_len = 1  # a segment's "caption" is its class label
    c.text.encoder = "class"
    c.text.class_names = list(SHAPES)
    c.data.max_frames = 1  # images: 2D positions do not encode time
    c.data.tasks = dict(t2v=1.0)  # no frames to condition on
    c.data.max_segments = 24  # images are short: more per pack
    c.sample.seq_len = 512
    c.eval.quality_every = 0  # the analyzer reads captioned synthetic clips only
    return c
