"""Export the JSON Schemas of every boundary object (``lepton schemas export``), for partners' engineers."""

from __future__ import annotations

import json
from pathlib import Path

from lepton_tasks.core import secagg_messages
from lepton_tasks.core.messages import json_schemas

#: where the committed copies live (a test checks they match the models)
SCHEMAS_DIR = Path("docs/schemas")


def render() -> dict[str, str]:
    """``{file name: JSON text}`` of every boundary model's schema (stable: sorted keys, trailing newline)."""
    return {
        f"{name}.schema.json": json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        for name, schema in {**json_schemas(), **secagg_messages.json_schemas()}.items()
    }


def export(out_dir: Path) -> list[Path]:
    """Write every schema into ``out_dir`` (created if needed); return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        path = out_dir / name
        path.write_text(text)
        written.append(path)
    return written
