import subprocess
import sys

import edm_sampling


def test_import_is_light():
    code = ("import sys, edm_sampling, edm_sampling.samplers, edm_sampling.cli; "
            "heavy = [m for m in ('diffusers', 'transformers', 'accelerate', 'matplotlib', 'sklearn', 'scipy') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing edm_sampling pulled in: {out}"


def test_lazy_exports_resolve():
    for name in edm_sampling.__all__:
        assert getattr(edm_sampling, name) is not None, name
