def handler(event, context):
    print(f"{context.function_name} got a {event.get('requestContext', {}).get('http', {}).get('method', 'raw')} event")
    return event
