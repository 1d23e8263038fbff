"""Write docs/REPRODUCTIONS.md from the measured results in bench/results/repro_*.json.

Nothing in the page is typed by hand except the introduction: each section is the
claim, setting, table (mean ± std over seeds), verdict and analysis that
``bench/reproduce.py METHOD`` stored. Rerun after any reproduction:

    python bench/reproductions_doc.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["step_by_step", "self_data", "redi", "miniplm", "ddk", "conditional", "draft_tiny"]
TITLES = {
    "step_by_step": "Distilling step-by-step (Hsieh et al. 2023)",
    "self_data": "Self-data distillation for pruned models (Thangarasa et al. 2025)",
    "redi": "REDI, reinforcement distillation (Xu et al. 2025)",
    "miniplm": "MiniPLM difference sampling (Gu et al. 2025)",
    "ddk": "DDK, domain-guided distillation (Liu et al. 2024)",
    "conditional": "Conditional training (Korbak et al. 2023)",
    "draft_tiny": "Distilled drafts for speculative decoding (DistillSpec / Drafter), tiny scale",
}

INTRO = """# Reproductions

Each method's headline claim, checked qualitatively at CPU scale on this machine (2 cores, no
GPU): tiny models trained from scratch on data generated here, at least 3 seeds, mean ± std.
The designs follow the spec's Appendix B. A claim that did not reproduce is reported as such,
with our analysis. This page is generated from `bench/results/*.json` by
`python bench/reproductions_doc.py`; each method's numbers come from

```bash
python bench/reproduce.py METHOD          # METHOD: step_by_step self_data redi miniplm ddk conditional
python bench/draft_tiny.py                # the draft experiment of docs/ONPOLICY.md (issue: draft models)
```

"""


def load(method: str) -> dict | None:
    for name in (f"repro_{method}.json", f"{method}.json"):
        path = ROOT / "bench" / "results" / name
        if path.is_file():
            return json.loads(path.read_text())
    return None


def main() -> None:
    parts = [INTRO, "| method | held | seeds | wall time |", "|---|---|---|---|"]
    found = {m: load(m) for m in ORDER}
    for m, r in found.items():
        if r is None:
            parts.append(f"| {TITLES[m]} | not run | - | - |")
        else:
            held = "yes" if r.get("held") is True else ("no" if r.get("held") is False else str(r.get("held")))
            parts.append(f"| [{TITLES[m]}](#{m}) | {held} | {len(r.get('seeds', []))} | "
                         f"{r.get('seconds', '?')} s |")
    for m, r in found.items():
        if r is None:
            continue
        page = f"docs/reproductions/{m}.md"
        parts += [
            "", f"<a id=\"{m}\"></a>", f"## {TITLES[m]}", "",
            f"**Claim.** {r['claim']}", "", f"**Setting.** {r['setting']}", "",
            r["table_md"], "",
            f"**Held:** {r.get('held')}. {r['analysis']}", "",
            f"Seeds {r.get('seeds')}; {r.get('seconds', '?')} s; finished {r.get('finished', '?')}."
            + (f" Details: [{page}]({Path(page).relative_to('docs')})." if (ROOT / page).is_file() else ""),
        ]
    (ROOT / "docs" / "REPRODUCTIONS.md").write_text("\n".join(parts) + "\n")
    print("wrote docs/REPRODUCTIONS.md")


if __name__ == "__main__":
    main()
