"""The project installs as itself and does not impersonate other libraries."""

import importlib.metadata
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_transformers_llama_imports_beside_octo_kernels():
    """Octo's kernels live in `octo_kernels`, not in a top-level `kernels`: transformers 5.25
    requires the Hub's `kernels` library and imports it (`from kernels import CUDAProperties, ...`)
    when its Llama loads, and a `kernels` of ours first on sys.path shadowed it (ImportError)."""
    from transformers import LlamaForCausalLM  # noqa: F401

    import octo_kernels  # noqa: F401

    spec = importlib.util.find_spec("kernels")  # the Hub's library, when installed; never ours
    assert spec is None or not Path(spec.origin or "").resolve().is_relative_to(ROOT), spec


def test_distribution_installed():
    assert importlib.metadata.version("octo-trainer")


def test_public_names():
    import octo_kernels
    from octo import OctoConfig, OctoForCausalLM

    assert callable(octo_kernels.rms_norm) and callable(octo_kernels.apply_rope)
    assert callable(octo_kernels.cross_entropy) and callable(octo_kernels.linear_cross_entropy)
    assert OctoForCausalLM(OctoConfig.preset("tiny")).num_parameters() > 0
