"""The PLM owner's service on Ray Serve: the data owner's jobs reach the PLM through it (resources.owner_url).

    PEMA_OWNER_TOKENS=acme:$(openssl rand -hex 16) pema serve-owner --config jobs/configs/default.yaml
    pema serve-owner --config jobs/configs/smoke.yaml --tokens owner_tokens.json --port 8000

Serves http://127.0.0.1:PORT/owner: /context, /sessions, /head, /health (pema/owner/service.py), until Ctrl+C.
Tokens come from --tokens (a JSON file {"tenant": "token"}) or $PEMA_OWNER_TOKENS (tenant:token,...); every request
is written to --audit as one JSONL line. The same service from a Serve config file: serve run serve/owner.yaml.
"""
from __future__ import annotations

from pathlib import Path

from pema.jobs.cli import run_job, serve_parser, serve_until_stopped


def main(argv: list[str] | None = None) -> int:
    parser = serve_parser(__doc__, 8000, prog="pema serve-owner")
    parser.add_argument("--tokens", help="JSON file {tenant: token}; default: $PEMA_OWNER_TOKENS")
    parser.add_argument("--audit", default="outputs/owner_audit.jsonl", help="the audit log (JSONL)")
    args = parser.parse_args(argv)

    def stage(cfg):
        from pema.executors.ray_serve import start_owner
        from pema.owner.service import load_tokens

        load_tokens(args.tokens)  # no tokens: a named error before anything starts
        Path(args.audit).parent.mkdir(parents=True, exist_ok=True)
        url = start_owner(cfg.model.model_id, port=args.port, dtype=cfg.model.dtype, device=cfg.resources.device,
                          revision=cfg.model.revision, tokens_file=str(Path(args.tokens).resolve()) if args.tokens
                          else None, audit_path=str(Path(args.audit).resolve()))
        return serve_until_stopped(url, f"the PLM owner's service (audit: {args.audit})", args.once)

    return run_job(args, stage, lock=False)  # a service reads the folder; jobs may run on it meanwhile

