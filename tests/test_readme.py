"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "curvx.track(" in b)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    rec = namespace["rec"]
    assert rec.status == "ok" and rec.step == 19
    assert rec.lambda_min is not None and rec.lambda_min <= rec.sharpness
