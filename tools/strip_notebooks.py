"""Strip outputs and execution counts from notebooks (run before committing one).

    python tools/strip_notebooks.py notebooks/*.ipynb
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def strip(path: Path) -> bool:
    nb = json.loads(path.read_text())
    changed = False
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            if cell.get("outputs") or cell.get("execution_count") is not None:
                changed = True
            cell["outputs"] = []
            cell["execution_count"] = None
        for key in ("execution", "collapsed"):
            if key in cell.get("metadata", {}):
                cell["metadata"].pop(key)
                changed = True
    if changed:
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return changed


if __name__ == "__main__":
    for arg in sys.argv[1:] or [str(p) for p in Path("notebooks").glob("*.ipynb")]:
        if strip(Path(arg)):
            print(f"stripped {arg}")
