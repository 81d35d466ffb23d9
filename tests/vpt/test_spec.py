"""Task specs and training options are checked without torch (front ends do it), and the torch-free
names agree with the registry of components."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vpt import method_names
from vpt.errors import TaskSpecError
from vpt.spec import TaskSpec

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"method": "bias+partial-1"}, "cannot be combined with bias"),
    ({"method": "linear", "pooling": "prompt_mean"}, "needs prompts"),
    ({"method": "adapter", "pooling": "prompt_mean"}, "needs prompts"),
    ({"method": "vpt-deep", "pooling": "max"}, "unknown pooling"),
    ({"method": "vpt-deep", "head": "mlp-12"}, "unknown head"),
    ({"method": "vpt-shallow+vpt-deep"}, "pick one"),
    ({"method": "vpt-shallow", "prompt_layers": "0-3"}, "vpt-deep only"),
])
def test_rules_between_a_specs_parts_need_no_backbone(kwargs: dict, words: str) -> None:
    with pytest.raises(TaskSpecError, match=words):
        TaskSpec(num_prompts=4, classes=("a", "b"), **kwargs)


def test_every_method_head_and_pooling_that_fits_together_is_accepted() -> None:
    for method in ("linear", *method_names.COMPONENT_NAMES, "vpt-deep+bias+adapter", "vpt-shallow+partial-1"):
        for head in ("linear", "mlp-3"):
            for pooling in method_names.POOLINGS:
                prompted = bool(method_names.PROMPTED & set(method_names.parse_method(method)))
                if pooling == "prompt_mean" and not prompted:
                    continue
                spec = TaskSpec(method, 4, ("a", "b"), head=head, pooling=pooling)
                assert spec.method == method_names.canonical_method(method)


def test_the_torch_free_names_are_the_registrys() -> None:
    from vpt import methods

    assert tuple(methods.COMPONENTS) == method_names.COMPONENT_NAMES
    assert methods.POOLINGS is method_names.POOLINGS
    assert methods.head_component("linear") is methods.LINEAR_HEAD
    assert methods.head_component("mlp-4") is methods.MLP_HEAD


def test_options_and_specs_are_checked_without_torch() -> None:
    """What a front end does with a training request's options loads neither torch nor the components."""
    code = ("import sys\n"
            "from vpt.errors import TrainOptionsError\n"
            "from vpt.options import from_form\n"
            "o = from_form([('method', 'vpt-deep+bias'), ('prompts', '7'), ('head', 'mlp-2'),"
            " ('pooling', 'prompt_mean'), ('prompt_layers', '0-3')])\n"
            "spec = o.spec(['cat', 'dog'])\n"
            "assert spec.num_prompts == 7 and spec.prompt_layers == (0, 3), spec\n"
            "try:\n"
            "    from_form([('method', 'bias+partial-1')]).spec(['a', 'b'])\n"
            "except TrainOptionsError as e:\n"
            "    print('refused:', e)\n"
            "print(sorted(m for m in ('torch', 'safetensors', 'vpt.methods', 'vpt.task') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-2].startswith("refused:") and "cannot be combined with bias" in lines[-2]
    assert lines[-1] == "[]"
