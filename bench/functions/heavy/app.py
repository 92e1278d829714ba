# The hello handler behind a heavier init: standard-library imports at module level.
import asyncio  # noqa: F401
import decimal  # noqa: F401
import email  # noqa: F401
import http.client  # noqa: F401
import json  # noqa: F401
import xml.etree.ElementTree  # noqa: F401


def handler(event, context):
    return {
        "statusCode": 200,
        "headers": {"content-type": "application/json"},
        "body": '{"hello":"world"}',
    }
