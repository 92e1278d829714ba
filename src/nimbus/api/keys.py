"""``/v1/keys``: API keys (admin scope): create one (its secret is shown once), list
them, revoke one."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body

from nimbus.api.scopes import needs
from nimbus.auth import SCOPES, KeyRing
from nimbus.errors import InvalidParameterValue

__all__ = ["keys_router"]


def keys_router(keys: KeyRing) -> APIRouter:
    router = APIRouter(tags=["keys"])

    @router.post("/v1/keys", status_code=201, dependencies=[needs("admin")])
    async def create_key(
        body: Annotated[
            dict[str, Any],
            Body(
                examples=[{"name": "ci", "scopes": ["deploy", "invoke"]}],
                description=f"name (text) and scopes (some of: {', '.join(SCOPES)})",
            ),
        ],
    ) -> Any:
        name = body.get("name", "")
        scopes = body.get("scopes", [])
        if not isinstance(name, str) or not isinstance(scopes, list):
            raise InvalidParameterValue("a key needs a name (text) and scopes (a list)")
        record, secret = await keys.create(name, [str(s) for s in scopes])
        # The secret is the bearer token; SigV4 clients sign with the id and the secret.
        return {**record.view(), "secret": secret}

    @router.get("/v1/keys", dependencies=[needs("admin")])
    async def list_keys() -> Any:
        return {"keys": [r.view() for r in keys.all()]}

    @router.delete("/v1/keys/{key_id}", dependencies=[needs("admin")])
    async def revoke_key(key_id: str) -> Any:
        return (await keys.revoke(key_id)).view()

    return router
