"""/docs (Swagger UI) and /redoc (ReDoc) served offline (their files from the `fastapi-offline` wheel, no CDN)
and the OpenAPI document's security schemes: which routes take an API key, which the admin token."""
from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response

from app.api.errors import APIError

ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
          "redoc.standalone.js": "text/javascript", "favicon.png": "image/png"}
SECURITY_SCHEMES = {
    "apiKey": {"type": "http", "scheme": "bearer",
               "description": "one of SOFTSERVE_API_KEYS (inference and read routes; open when unset)"},
    "adminToken": {"type": "http", "scheme": "bearer",
                   "description": "SOFTSERVE_ADMIN_TOKEN (prompt changes, files and fine-tuning; loopback clients only "
                                  "when unset)"},
}


def install_docs(app: FastAPI) -> None:
    """Call after every router is included (create the app with docs_url=None)."""
    @app.get("/docs", include_in_schema=False)
    async def swagger_ui():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    async def redoc():
        return get_redoc_html(openapi_url=app.openapi_url, title=f"{app.title} - API",
                              redoc_js_url="/docs/assets/redoc.standalone.js",
                              redoc_favicon_url="/docs/assets/favicon.png", with_google_fonts=False)

    @app.get("/docs/assets/{name}", include_in_schema=False)
    async def swagger_asset(name: str):
        if name not in ASSETS:
            raise APIError(404, f"no docs asset named {name!r}", "not_found")
        data = resources.files("fastapi_offline").joinpath("static", name).read_bytes()
        return Response(data, media_type=ASSETS[name], headers={"Cache-Control": "public, max-age=86400"})

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes, tags=app.openapi_tags)
            schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
            error = {"$ref": "#/components/schemas/ErrorResponse"}
            for operations in schema["paths"].values():
                for operation in operations.values():
                    _errors_are_error_responses(operation.get("responses", {}), error)
                    # the routes that check a token document its 401; of those only the admin routes a 403
                    responses = operation.get("responses", {})
                    if "401" in responses:
                        operation["security"] = [{"adminToken" if "403" in responses else "apiKey": []}]
            for name in ("HTTPValidationError", "ValidationError"):
                schema["components"].get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _errors_are_error_responses(responses: dict, error: dict) -> None:
    """FastAPI documents a 422 with its own validation-error body on every route with parameters; here a
    request that breaks the schema is a 400 with the one error shape."""
    auto = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
    if auto.get("$ref", "").endswith("/HTTPValidationError"):
        del responses["422"]
        responses.setdefault("400", {"description": "a field breaks the schema (`param` names it)",
                                     "content": {"application/json": {"schema": error}}})
