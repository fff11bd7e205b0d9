"""Results -> the markdown table (tokens/s, ms/step, MFU, memory, ratio to transformers) and the
block around it (device, versions, host, date, command), from the results alone."""
from __future__ import annotations

import datetime

from llava_jax.tools.bench.workload import Geometry, variant_label


def derive(r: dict, geo: Geometry, peak_override: float | None) -> dict:
    """tokens/s, MFU, GB from a raw result."""
    out = dict(r)
    if not r.get("ok"):
        return out
    sec = r["sec_per_step"]
    if r["work"] == "decode":
        out["tokens_per_s"] = r["batch"] / sec if sec > 0 else float("nan")
        out["mfu"] = None
    else:
        from llava_jax.train_step import step_flops

        tokens = geo.train_batch * geo.seq_len
        out["tokens_per_s"] = tokens / sec
        flops = step_flops(geo.llava_config(), {"projector"} | ({"llm"} if r["stage"] == 2 else set()),
                           tokens, geo.train_batch, geo.seq_len)
        from llava_jax.train.metrics import peak_tflops  # the one table of device peaks

        peak = peak_override or peak_tflops(r.get("device_kind", ""))
        out["step_tflop"] = flops / 1e12
        out["mfu"] = flops / sec / (peak * 1e12) if peak else None
    return out


def side_label(r: dict) -> str:
    if r["framework"] == "jax" and r["work"] == "decode":  # only the XLA flags reach decoding
        x, dt = r["variant"]["xla"], r["variant"].get("serve_dtype", "bfloat16")
        return ("llava-jax (Engine" + ("" if dt == "bfloat16" else f", {dt}") + ("" if x == "default" else f", xla={x}")
                + ")")
    if r["framework"] == "jax":
        return f"llava-jax ({variant_label(r['variant'])})"
    if r["framework"] == "llamacpp":
        return f"llama.cpp ({r['quant']} GGUF)"
    return "transformers " + ("compiled" if r["compiled"] else "eager")


def work_label(r: dict, geo: Geometry) -> str:
    if r["work"] == "decode":
        return f"decode B={r['batch']} ({geo.prompt_len}-token prompt + {geo.new_tokens} new)"
    return f"stage {r['stage']} train (B={geo.train_batch}, L={geo.seq_len})"


def _fmt(x, spec: str, none: str = "–") -> str:
    return none if x is None or x != x else format(x, spec)


def _pct(x) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}%" if x >= 0.01 else f"{100 * x:.2g}%"


def render_table(results: list[dict], geo: Geometry, peak_override: float | None = None) -> str:
    rows = [derive(r, geo, peak_override) for r in results]
    order = {"train1": 0, "train2": 1, "decode": 2}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (order["decode"] if r["work"] == "decode" else order[f"train{r['stage']}"], r.get("batch", 0))
        groups.setdefault(key, []).append(r)
    lines = ["| work | implementation | tokens/s | ms/step | MFU | peak memory | vs transformers | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups):
        g = groups[key]
        base = next((r for r in g if r["framework"] == "torch" and r["ok"] and r["compiled"]), None) \
            or next((r for r in g if r["framework"] == "torch" and r["ok"]), None)
        g.sort(key=lambda r: (["jax", "llamacpp", "torch"].index(r["framework"]), not r.get("compiled", True)))
        for i, r in enumerate(g):
            work = work_label(r, geo) if i == 0 else ""
            if not r["ok"]:
                err = r.get("error", "")[:160].replace("|", "\\|")
                lines.append(f"| {work} | {side_label(r)} | failed | | | | | {err} |")
                continue
            ratio = (r["tokens_per_s"] / base["tokens_per_s"]) if base and base["tokens_per_s"] else None
            ratio_s = _fmt(ratio, ".2f")
            ratio_s += "x" if ratio_s != "–" else ""
            mem = r.get("peak_bytes")
            mem_s = "–" if mem is None else ("~" if r.get("peak_source") == "xla-estimate" else "") + \
                (f"{mem / 1e9:.2f} GB" if mem >= 1e8 else f"{mem / 1e6:.2f} MB")
            notes = []
            if r["work"] == "decode":
                notes.append(f"prefill {r['prefill_s'] * 1e3:.1f} ms")
                if r["framework"] == "llamacpp":
                    notes.append(f"of which image encode {r['image_encode_s'] * 1e3:.1f} ms; {r['prompt_tokens']} "
                                 f"prompt tokens; LLM file {r['llm_file_bytes'] / 1e6:.1f} MB")
            else:
                notes.append(f"loss {r['loss_first']:.3f}→{r['loss_last']:.3f}")
            if r.get("compile_s") is not None:
                notes.append(f"warm-up/compile {r['compile_s']:.0f} s")
            tok_spec = ",.0f" if r["tokens_per_s"] >= 100 else ".1f"  # CPU decoding: a few tokens/s
            lines.append(f"| {work} | {side_label(r)} | {_fmt(r['tokens_per_s'], tok_spec)} | "
                         f"{_fmt(r['sec_per_step'] * 1e3, '.2f')} | {_pct(r['mfu'])} | {mem_s} | {ratio_s} | "
                         f"{'; '.join(notes)} |")
    return "\n".join(lines)


def markdown_block(results: list[dict], preset: str, table: str) -> str:
    """Device, versions, host, date and exact command(s), all as recorded by the runs themselves
    (so results saved on a GPU machine render the same anywhere with --from_json)."""
    devices = sorted({r["device"] for r in results if r.get("ok") and r.get("device")})
    vers = {}
    for r in results:
        vers.update(r.get("versions", {}))
    hosts = sorted({r["host"] for r in results if r.get("host")})
    commands = list(dict.fromkeys(r["command"] for r in results if r.get("command")))
    dates = sorted(r["date"] for r in results if r.get("date"))
    date = dates[0] if dates else datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if len(dates) > 1 and dates[-1] != dates[0]:
        date += f" to {dates[-1]}"
    notes = []
    torch_runs = [r for r in results if r["framework"] == "torch"]
    if torch_runs and not any(r.get("compiled") for r in torch_runs):
        notes.append("transformers ran eager only (torch.compile skipped"
                     + (" on CPU)" if all(r.get("platform") == "cpu" for r in torch_runs if r.get("ok")) else ")"))
    if any(r.get("peak_source") == "xla-estimate" for r in results):
        notes.append("~ peak memory = XLA's estimate for the compiled step (no device counters on CPU)")
    return "\n".join([
        f"### {preset} preset — {', '.join(devices) or 'no device'} — {date}",
        "",
        *[f"`{c}`" + ("  " if i < len(commands) - 1 else "") for i, c in enumerate(commands)],
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in vers.items())}. Host: {', '.join(hosts)}.",
        *([""] + [f"Note: {n}." for n in notes] if notes else []),
        "",
        table,
        "",
    ])
