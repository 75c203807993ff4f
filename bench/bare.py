"""The floor of the stack: a bare aiohttp handler serving the gateway's bytes at its route.

It reads the request body like the gateway and answers the bytes the gateway would (looked up
by campaignId, from a JSON file the bench writes), with the same Content-Type; nothing else.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aiohttp import web

ROUTE = "/rest/isales/v1/openapi/campaigns/{vdnId}/callresult/{campaignId}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.bare")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bodies", required=True, help='JSON {"content_type", "bodies"}')
    args = parser.parse_args()
    spec = json.loads(Path(args.bodies).read_text())
    content_type: str = spec["content_type"]
    bodies = {k: v.encode() for k, v in spec["bodies"].items()}

    async def callresult(request: web.Request) -> web.Response:
        await request.read()
        body = bodies[request.match_info["campaignId"]]
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_post(ROUTE, callresult)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
