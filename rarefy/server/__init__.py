"""rarefy's OpenAI-compatible server: `rarefy serve` (docs/serving.md).

    from rarefy.server import build_server, ServerThread
    app = build_server(loaded, EngineOptions(max_num_seqs=32))
    with ServerThread(app) as srv:          # uvicorn on 127.0.0.1, a free port
        print(srv.url)                      # http://127.0.0.1:PORT
"""

from rarefy.server.runner import ServerThread, build_server, served_model_name

__all__ = ["ServerThread", "build_server", "served_model_name"]
