"""The full hostile-input campaign (issue 20, extended in issue 28): ≥ 10,000 seeded mutations, one counts table.

Usage:
  python benchmarks/fuzz.py [--packs 4000] [--adapters 4000] [--http 1500] [--cards 1000] [--names 1000]
                            [--secrets 500] [--serve 2000] [--seed 0] [--out benchmarks/results/fuzz.md]

The generators and the outcome rules are ``tests/fuzzing.py`` (the suite's
``tests/test_hostile.py`` runs a few hundred of the same cases). Families: pack files
(fixtures flipped, cut, or a header field / index cell / scale / stream changed and
re-signed), adapter folders (config fields, JSON text, safetensors header entries, weight
bytes, key names), raw HTTP requests to a loopback Hub server, hostile artefact names, URLs
with credentials. Issue 28 (round three) added the classes the first campaign missed: pack
header numbers scaled (density, shapes, index cells, v2 table counts), streams emptied under
shapes that claim elements, cross-tensor geometry (A/B shapes swapped, re-ranked; decoded
packs must pair A [r, in] with B [out, r]); adapters with ``target_modules: null`` or a
``lora_B.bias`` (any shape, alone, ``lora_bias`` true/false/absent), where an accepted folder
must also attach to the tiny Llama as ``use`` attaches it (``unexpected:AcceptedThenRefused``
otherwise); model cards with values YAML allows and JSON does not, planted in the local Hub
(model info and listings must answer 200 with JSON cardData) and committed over HTTP (400
exactly when the card has no JSON metadata). The baseline row of each file family is the unmutated seed, which must be
accepted: a campaign whose reader refused everything would also "pass".

Must be zero: ``unexpected:*`` (an exception other than IntegrityError / UsageError),
``accepted_invalid`` (accepted, but the result is non-finite, out of range, of inconsistent
geometry or not Hub-like; a secret that survived redaction; a card answered or committed wrongly), ``http_5xx``, ``dropped`` (connection closed without an
answer), ``over_cap`` (a case after which the process's peak RSS had grown by more than the cap).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT))

import fuzzing  # noqa: E402
from hubutil import running_hub  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "fuzz.md"
COLUMNS = ["cases", "refused", "accepted", "accepted_invalid", "unexpected", "http_5xx", "dropped", "over_cap"]


def _seed_baseline(tmp: Path) -> dict[str, str]:
    """Whether the unmutated seeds are accepted by the same checks (they must be)."""
    out = {}
    for name in fuzzing.FIXTURE_NAMES:
        path = tmp / f"seed-{name}.pack"
        path.write_bytes(fuzzing.load_fixture(name)[0])
        out[f"pack ({name} fixture)"] = fuzzing._measured(lambda path=path: fuzzing._check_pack(path))[0]
    folder = fuzzing.seed_adapter().to_folder(tmp / "seed-adapter")
    out["adapter (seed folder)"] = fuzzing._measured(lambda: fuzzing._check_adapter(folder))[0]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packs", type=int, default=4000)
    ap.add_argument("--adapters", type=int, default=4000)
    ap.add_argument("--http", type=int, default=1500)
    ap.add_argument("--cards", type=int, default=1000)
    ap.add_argument("--names", type=int, default=1000)
    ap.add_argument("--secrets", type=int, default=500)
    ap.add_argument("--serve", type=int, default=2000, help="Random OpenAI-shaped bodies sent to adapt serve.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        baseline = _seed_baseline(tmp)  # also compiles the decoder: the tally's memory starts after it
        tally = fuzzing.Tally()
        steps = [("pack", lambda: fuzzing.run_pack_cases(tally, tmp, args.seed + 1, args.packs)),
                 ("adapter", lambda: fuzzing.run_adapter_cases(tally, tmp, args.seed + 2, args.adapters)),
                 ("name", lambda: fuzzing.run_name_cases(tally, args.seed + 4, args.names)),
                 ("secret", lambda: fuzzing.run_secret_cases(tally, args.seed + 5, args.secrets))]
        for family, step in steps:
            t0 = time.perf_counter()
            step()
            seconds[family] = time.perf_counter() - t0
            print(f"{family}: {dict(tally.counts[family])}", flush=True)
        with running_hub(tmp / "hub") as hub:
            fuzzing.seed_hub(hub.store)
            t0 = time.perf_counter()
            fuzzing.run_http_cases(tally, hub.endpoint, args.seed + 3, args.http)
            seconds["http"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            fuzzing.run_card_cases(tally, hub.endpoint, hub.store, args.seed + 6, args.cards)
            seconds["card"] = time.perf_counter() - t0
            alive = fuzzing.raw_request(hub.endpoint, fuzzing.request_bytes("GET", "/api/models"))[0]
        print(f"http: {dict(tally.counts['http'])}", flush=True)
        print(f"card: {dict(tally.counts['card'])}", flush=True)
        serve_run = _serve_campaign(tally, tmp, args, seconds)
    text = render(args, tally, seconds, baseline, alive, serve_run)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(f"written {args.out}")
    serve_ok = serve_run["alive"] == 200 and serve_run["rss_after"] <= 1.1 * serve_run["rss_before"]
    return 0 if not tally.bad() and alive == 200 and serve_ok and set(baseline.values()) == {"accepted"} else 1


def _serve_campaign(tally: fuzzing.Tally, tmp: Path, args, seconds: dict) -> dict:
    """The serve fuzz: ``--serve`` random bodies, 8 at a time, on the tiny base with a LoRA and a pack.

    The server runs in this process; its resident size is read (not the peak) after a warm-up of
    50 requests and again after the run, each after a garbage collection: the run must give back
    what it took (within 10%)."""
    import gc

    from adapterhub_c.serve.server import BackgroundServer, ServeOptions

    reg, base, models = fuzzing.serve_world(tmp / "serve-home")
    opts = ServeOptions(all=True, token=fuzzing.SERVE_TOKEN, batch_window_ms=20)
    with BackgroundServer(reg, base, opts) as srv:
        fuzzing.run_serve_cases(fuzzing.Tally(), srv.endpoint, fuzzing.SERVE_TOKEN, models, args.seed + 90, 50)
        gc.collect()
        before = fuzzing.current_rss()
        t0 = time.perf_counter()
        fuzzing.run_serve_cases(tally, srv.endpoint, fuzzing.SERVE_TOKEN, models, args.seed + 7, args.serve)
        seconds["serve"] = time.perf_counter() - t0
        gc.collect()
        after = fuzzing.current_rss()
        alive = fuzzing._post(srv.endpoint, "/v1/completions", b'{"model": "fuzz-lora", "prompt": "hi", '
                              b'"max_tokens": 2}', fuzzing.SERVE_TOKEN, 60)
    reg.close()
    print(f"serve: {dict(tally.counts['serve'])}", flush=True)
    return {"rss_before": before, "rss_after": after, "alive": alive}


def render(args, tally: fuzzing.Tally, seconds: dict, baseline: dict, alive, serve_run: dict) -> str:
    total = sum(c["cases"] for c in tally.counts.values())
    lines = ["# Hostile-input campaign (issues 20 and 28)", "",
             f"Command: `python benchmarks/fuzz.py {' '.join(sys.argv[1:])}`".replace("`python benchmarks/fuzz.py `",
                                                                                     "`python benchmarks/fuzz.py`"),
             "", f"{total:,} cases, seed {args.seed}; generators and outcome rules in `tests/fuzzing.py`. "
             f"Allocation cap {fuzzing.ALLOC_CAP / 2**20:.0f} MiB of peak-RSS growth over the campaign's start "
             "(`ru_maxrss`, read after every case).", "",
             "| family | " + " | ".join(COLUMNS) + " | peak RSS growth | ms / case |",
             "|---|" + "---|" * (len(COLUMNS) + 2)]
    for family in ("pack", "adapter", "http", "card", "name", "secret", "serve"):
        c = tally.counts.get(family)
        if not c:
            continue
        unexpected = sum(v for k, v in c.items() if k.startswith("unexpected"))
        cells = [c["cases"], c["refused"], c["accepted"], c["accepted_invalid"], unexpected, c["http_5xx"],
                 c["dropped"], c["over_cap"]]
        peak = tally.peak.get(family, 0)
        lines.append(f"| {family} | " + " | ".join(f"{v:,}" for v in cells)
                     + f" | {peak / 2**20:.1f} MiB | {1000 * seconds[family] / c['cases']:.2f} |")
    lines += ["", "Baseline (unmutated seeds through the same checks): "
              + ", ".join(f"{k}: {v}" for k, v in baseline.items())
              + f"; server answering after the HTTP run: {'yes (200)' if alive == 200 else alive}.", "",
              f"adapt serve: resident size {serve_run['rss_before'] / 2**20:.1f} MiB after a 50-request warm-up, "
              f"{serve_run['rss_after'] / 2**20:.1f} MiB after the {args.serve:,} requests "
              f"({serve_run['rss_after'] / serve_run['rss_before']:.3f}x; must be within 10%); a normal request "
              f"after the run: {serve_run['alive']}.", ""]
    bad = tally.bad()
    lines.append("Must-be-zero counts: " + ("all zero." if not bad else ", ".join(f"{k} = {v}" for k, v in bad.items())))
    if tally.examples:
        lines += ["", "First example of each non-zero bad outcome:", ""]
        lines += [f"- `{k}`: {v}" for k, v in sorted(tally.examples.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
