"""``/v1/secrets``: set, list, describe and remove secrets. No route returns a value."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Response

from nimbus.api.scopes import needs
from nimbus.auth.keys import DEFAULT_TENANT
from nimbus.auth.secrets import SecretRecord, Secrets, check_secret_name
from nimbus.errors import InvalidParameterValue, ResourceConflict

__all__ = ["secrets_router"]


def secrets_router(
    secrets: Secrets,
    users_of: Callable[[str], list[str]],
    changed: Callable[[str], Awaitable[list[str]]],
) -> APIRouter:
    """``users_of(name)``: the functions using a secret; ``changed(name)``: replace
    their instances after its value changed."""
    router = APIRouter(tags=["secrets"])

    def view(record: SecretRecord) -> dict[str, Any]:
        return {**record.public(), "used_by": users_of(record.name)}

    @router.put("/v1/secrets/{name}", dependencies=[needs("deploy")])
    async def set_secret(
        name: str,
        response: Response,
        body: Annotated[
            dict[str, Any],
            Body(examples=[{"value": "s3cr3t"}], description="value (text): never shown again"),
        ],
    ) -> Any:
        check_secret_name(name)
        value = body.get("value")
        if not isinstance(value, str):
            raise InvalidParameterValue('send the secret as {"value": "..."} (text)')
        record, created = await secrets.set(DEFAULT_TENANT, name, value)
        response.status_code = 201 if created else 200
        if not created:
            await changed(name)
        return view(record)

    @router.get("/v1/secrets", dependencies=[needs("read")])
    async def list_secrets() -> Any:
        return {"secrets": [view(r) for r in secrets.of(DEFAULT_TENANT)]}

    @router.get("/v1/secrets/{name}", dependencies=[needs("read")])
    async def get_secret(name: str) -> Any:
        return view(secrets.get(DEFAULT_TENANT, name))

    @router.delete("/v1/secrets/{name}", status_code=204, dependencies=[needs("deploy")])
    async def delete_secret(name: str) -> Response:
        secrets.get(DEFAULT_TENANT, name)
        users = users_of(name)
        if users:
            raise ResourceConflict(
                f"secret {name!r} is used by {', '.join(users)}; remove it from their "
                "'secrets' and deploy them first"
            )
        await secrets.delete(DEFAULT_TENANT, name)
        return Response(status_code=204)

    return router
