"""The HTTP service's endpoints, one ``APIRouter`` per concern.

recall.py    POST /recall, POST /recall/batch, GET /items/{item_id}/similar
events.py    POST /events (interactions appended to their users' states)
ops.py       GET /health, GET /ready, GET /metrics, POST /admin/reload
items.py     POST /admin/items (the catalogue changed in place)
explorer.py  GET / (the explorer page) and GET/POST /explorer/... (the rows it shows)

Handlers reach the shared ``ServiceState`` through ``Depends`` (``state.Service``)
and return the response model they declare.
"""
