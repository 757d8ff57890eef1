"""Tables and a plot from bench_llm.py's llm_results.json:
``python benchmarks/llm_report.py`` prints the markdown, writes llm_speed.png and
replaces the LLM section of benchmarks/README.md (between its markers)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- llm-begin -->", "<!-- llm-end -->"
PARAMS = {}


def _params(res, model):
    for r in res["lowbit"]:
        if r["model"] == model and r["variant"] == "torch fp32":
            return r["file_bytes"] / 4
    return None


def _get(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def tables(res) -> str:
    out = []
    for model, title in (("smollm2", "SmolLM2-135M-Instruct"), ("llama1b", "1B-shaped Llama (random weights)")):
        rows = [r for r in res["lowbit"] if r["model"] == model]
        if not rows:
            continue
        params = _params(res, model)
        threads = sorted({r["threads"] for r in rows})
        ref = _get(rows, variant="torch fp32", threads=max(threads)) or {}
        out.append(f"### {title}, {res['machine']}, {res['date']}\n")
        head = "| variant | file MiB | bits/param | PPL (Emma, 32x512) |" + \
            "".join(f" pp512 {t}t | tg128 {t}t |" for t in threads)
        out += [head, "|" + "---|" * (4 + 2 * len(threads))]
        names = list(dict.fromkeys(r["variant"] for r in rows))
        lines = [(n, [_get(rows, variant=n, threads=t) for t in threads]) for n in names]
        lines += [(f"llama.cpp {t}", [_get(res["llamacpp"], model=model, type=t, threads=th) for th in threads])
                  for t in dict.fromkeys(r["type"] for r in res["llamacpp"] if r["model"] == model)]
        for name, per in lines:
            first = next((r for r in per if r), None)
            if first is None:
                continue
            ppl = next((r.get("ppl") for r in per if r and r.get("ppl")), None)
            bpp = 8 * first["file_bytes"] / params if params else float("nan")
            ppl_s = "-" if ppl is None or model != "smollm2" else \
                f"{ppl:.3f}" + (f" ({ppl / ref['ppl']:.3f}x)" if ref.get("ppl") else "")
            cells = "".join(f" {r['pp']:.1f} | {r['tg']:.1f} |" if r else " - | - |" for r in per)
            out.append(f"| {name} | {first['file_bytes'] / 2**20:.1f} | {bpp:.2f} | {ppl_s} |{cells}")
        out.append("")
        prof = [r for r in rows if r.get("profile")]
        if prof:
            cats = list(prof[0]["profile"])
            out.append(f"Decode step time split, ms per token ({max(threads)} threads):\n")
            out.append("| variant | " + " | ".join(cats) + " |")
            out.append("|---|" + "---|" * len(cats))
            for r in prof:
                out.append(f"| {r['variant']} | " + " | ".join(f"{r['profile'][c]:.1f}" for c in cats) + " |")
            out.append("")
    return "\n".join(out)


def plot(res, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    models = [m for m in ("smollm2", "llama1b") if any(r["model"] == m for r in res["lowbit"])]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        th = max(r["threads"] for r in res["lowbit"] if r["model"] == model)
        bars = [(r["variant"], r["tg"]) for r in res["lowbit"] if r["model"] == model and r["threads"] == th]
        bars += [(f"llama.cpp {r['type']}", r["tg"]) for r in res["llamacpp"] if r["model"] == model
                 and r["threads"] == th]
        colors = ["tab:blue" if n.startswith("lowbit") else "tab:gray" if n.startswith("torch") else "tab:orange"
                  for n, _ in bars]
        ax.barh([n for n, _ in bars], [v for _, v in bars], color=colors)
        ax.set_xlabel(f"tg128 tokens/s, {th} threads")
        ax.set_title(model)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    res = json.loads((HERE / "llm_results.json").read_text())
    md = tables(res)
    print(md)
    plot(res, HERE / "llm_speed.png")
    readme = HERE / "README.md"
    text = readme.read_text()
    section = f"{BEGIN}\n## LLMs (bench_llm.py)\n\n![tg128](llm_speed.png)\n\n{md}\n{END}"
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
