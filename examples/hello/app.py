import json


def handler(event, context):
    """Answers an HTTP request (payload 2.0 event) or a raw invoke event."""
    name = (event.get("queryStringParameters") or {}).get("name") or event.get("name") or "world"
    return {
        "statusCode": 200,
        "headers": {"content-type": "application/json"},
        "body": json.dumps({"message": f"Hello, {name}!"}),
    }
