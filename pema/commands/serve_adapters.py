"""Registered adapters served on Ray Serve: POST http://127.0.0.1:PORT/adapters {"adapter": "NAME@champion",
"texts": [...]} with Authorization: Bearer <token> -> {"model": "NAME/VERSION", "texts": [...]}, until Ctrl+C.

    PEMA_ADAPTER_TOKENS=acme:$(openssl rand -hex 16) pema serve-adapters --config jobs/configs/default.yaml \
        --output-dir outputs/default --port 8001
    pema serve-adapters --config jobs/configs/smoke.yaml --tokens adapter_tokens.json --port 8001

The registry is MLFLOW_TRACKING_URI or <output-dir>/mlflow.db. The base model is model.model_id here, or the owner's
service with resources.owner_url (then no PLM weights are loaded by this service). Tokens come from --tokens (a JSON
file {"tenant": "token"}) or $PEMA_ADAPTER_TOKENS (tenant:token,...); every request, refused ones too, is written to
--audit as one JSONL line. Texts are capped at data.max_tokens tokens each (data.overlength: error or truncate),
32 per request, 1 MiB per body (pema/jobs/serve_adapters.py).
"""
from __future__ import annotations

from pathlib import Path

from pema.jobs.cli import run_job, serve_parser, serve_until_stopped


def main(argv: list[str] | None = None) -> int:
    parser = serve_parser(__doc__, 8001, prog="pema serve-adapters")
    parser.add_argument("--tokens", help="JSON file {tenant: token}; default: $PEMA_ADAPTER_TOKENS")
    parser.add_argument("--audit", default="outputs/adapters_audit.jsonl", help="the audit log (JSONL)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas, each with its own base model (default 1)")
    args = parser.parse_args(argv)

    def stage(cfg):
        from pema.config import to_dict
        from pema.formats.access import load_tokens
        from pema.jobs.serve_adapters import TOKENS_ENV, start_adapters
        from pema.tracking.runs import connect

        load_tokens(args.tokens, env=TOKENS_ENV)  # no tokens: a named error before anything starts
        Path(args.audit).parent.mkdir(parents=True, exist_ok=True)
        url = start_adapters(connect(args.output_dir), to_dict(cfg), port=args.port, replicas=args.replicas,
                             tokens_file=str(Path(args.tokens).resolve()) if args.tokens else None,
                             audit_path=str(Path(args.audit).resolve()))
        return serve_until_stopped(url, f"the registered adapters (audit: {args.audit})", args.once)

    return run_job(args, stage, lock=False)  # a service reads the folder; jobs may run on it meanwhile

