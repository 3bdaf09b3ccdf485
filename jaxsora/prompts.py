"""Prompt extension: a short user prompt -> the detailed caption the model was trained on.

Sora expands a short prompt into a long, detailed caption with a language model before
sampling, because the model was trained on detailed (re-)captions and follows them best.
`jaxsora.sample` applies one extender to every prompt before tokenizing, named by
`config.sample.prompt_extension` (default "identity") or `--prompt_extension`:

  identity                 the prompt as given
  template                 the bundled synthetic data's grammar (`data_pipelines/synthetic_clips`):
                           "red circle" -> "a red circle on a blue background"
  package.module:function  any function `str -> str`, imported by name

Plugging in a real language model: write a function that takes the short prompt and returns
the caption, in a module on the Python path, e.g.

    # my_prompts.py
    import functools

    @functools.cache
    def _llm():
        from llama_cpp import Llama  # or transformers, vLLM, an HTTP client to a local server
        return Llama(model_path="/models/small-instruct.gguf")

    def extend(prompt: str) -> str:
        instruction = f"Describe a video of '{prompt}' in one detailed sentence:"
        return _llm()(instruction, max_tokens=77)["choices"][0]["text"].strip()

and sample with `--prompt_extension my_prompts:extend`. The function is called once per request,
on the host, before anything is compiled; load the model lazily (as above) so that importing the
module stays cheap, and keep the output within what the text encoder reads (model.text_len).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

# The template's stated defaults for what a short prompt leaves out.
DEFAULT_SHAPE = "circle"
DEFAULT_COLOR = "red"
DEFAULT_BACKGROUND = "blue"  # "white" when the shape itself is blue
BUILTIN = ("identity", "template")


def identity(prompt: str) -> str:
    return prompt


def template(prompt: str) -> str:
    """A short prompt in the synthetic clips' caption grammar, keeping every attribute the user
    gave and filling the rest with the defaults above:

        {a|an} COLOR SHAPE[ moving DIRECTION] on {a|an} BACKGROUND background

    A colour after "on" (or next to "background"), or the second colour named, is the
    background; the first is the shape's. No direction word means a still shape (no motion
    clause), as the data captions images. Words outside the vocabulary are dropped: the model
    never saw them.
    """
    # The builder module is the one source of the vocabulary (imported only for this extender).
    from data_pipelines.synthetic_clips.synthetic_clips import COLORS, DIRECTIONS, SHAPES, _a

    words = re.findall(r"[a-z]+", prompt.lower())
    plural = {s + "s": s for s in SHAPES} | {"crosses": "cross"}
    split = next((i for i, w in enumerate(words) if w in ("on", "over", "against")), len(words))
    colors_before = [w for w in words[:split] if w in COLORS]
    colors_after = [w for w in words[split:] if w in COLORS]
    if not colors_after and len(colors_before) > 1:
        colors_after = colors_before[1:2]
    shape = next((plural.get(w, w) for w in words if plural.get(w, w) in SHAPES), DEFAULT_SHAPE)
    color = colors_before[0] if colors_before else None
    background = colors_after[0] if colors_after else None
    if color is None:
        color = DEFAULT_COLOR if background != DEFAULT_COLOR else "white"
    if background is None or background == color:
        background = DEFAULT_BACKGROUND if color != DEFAULT_BACKGROUND else "white"
    direction = next((w for w in words if w in DIRECTIONS), None)
    motion = f" moving {direction}" if direction else ""
    return f"{_a(color)} {color} {shape}{motion} on {_a(background)} {background} background"


def get_prompt_extender(name: str) -> Callable[[str], str]:
    """The extender `name` names: "identity", "template" or "package.module:function"."""
    if name == "identity":
        return identity
    if name == "template":
        return template
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"prompt extension {name!r} is not one of {BUILTIN} or 'package.module:function' "
            "(a function taking and returning a string)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"prompt extension {name!r}: cannot import module {module_name!r} ({e}); put it on "
            "the Python path or fix the name"
        ) from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        what = "has no attribute" if fn is None else "has a non-callable"
        raise ValueError(
            f"prompt extension {name!r}: module {module_name!r} {what} {attr!r}; name a "
            "function taking and returning a string"
        )

    def checked(prompt: str) -> str:
        out = fn(prompt)
        if not isinstance(out, str):
            raise TypeError(
                f"prompt extension {name!r} returned {type(out).__name__} for {prompt!r}; it "
                "must return the caption as a string"
            )
        return out

    return checked
