"""Run the studio's web UI: `python app.py` serves http://127.0.0.1:7860 with the embedded model.

    python app.py [--host 127.0.0.1] [--port 7860] [--model SRC] [--out DIR] [--share]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from studio.quiet import quiet_libraries

quiet_libraries()  # before pipelines imports diffusers and transformers: their chatter is not the user's business

from pipelines import StudioError, load_model  # noqa: E402
from studio.ui import CSS, build_app  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", default=None,
                   help="diffusers folder, .safetensors checkpoint or hub id (default: the embedded model)")
    p.add_argument("--out", type=Path, default=Path("out"), help="where generated images are saved (default out/)")
    p.add_argument("--share", action="store_true", help="also serve through a public Gradio link")
    args = p.parse_args(argv)
    try:
        model = load_model(args.model)
    except StudioError as e:
        p.exit(2, f"error: {e}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    demo = build_app(model, args.out)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, allowed_paths=[str(args.out)],
                css=CSS)


if __name__ == "__main__":
    main()
