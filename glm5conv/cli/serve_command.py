"""glm5conv serve CKPT"""

from __future__ import annotations

from typing import Annotated

import typer

from glm5conv.bundled import resolve_source
from glm5conv.cli import app
from glm5conv.cli.generate_command import DeviceOption, DtypeOption

EXAMPLES = """Examples:

  glm5conv serve bundled:tiny-glm5-trained --port 8000
  python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-'); \\
      print(c.completions.create(model='tiny-glm5-trained', prompt='def ', max_tokens=32).choices[0].text)"
"""


@app.command("serve", epilog=EXAMPLES)
def serve_cmd(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint folder, or bundled:NAME.")],
    host: Annotated[
        str, typer.Option("--host", help="Address to bind (loopback unless told otherwise).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    speculative_num_steps: Annotated[int, typer.Option("--speculative-num-steps", min=0, help="0 = no MTP.")] = 3,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
) -> int:
    """Serve an OpenAI-compatible API (completions, chat, SSE streaming) with MTP speculative decoding."""
    from glm5conv.runtime import load_model
    from glm5conv.server import serve

    loaded = load_model(resolve_source(checkpoint), device=device, dtype=dtype)
    typer.echo(f"glm5conv: serving {loaded.path.name} on http://{host}:{port}/v1", err=True)
    serve(loaded, host, port, speculative_num_steps)
    return 0
