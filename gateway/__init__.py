"""isales-gateway: a drop-in, rate-limiting, caching gateway for the CC-iSales callresult query.

The request path, one module per stage:
    middleware (request id, errors) -> handlers -> validation -> cache_policy/cache
    -> coalesce -> limiter -> signing -> upstream -> metrics
``app.py`` wires them; ``simulator/`` is the upstream stand-in.
"""

__version__ = "0.1.0"
