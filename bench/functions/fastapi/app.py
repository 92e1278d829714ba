from fastapi import FastAPI
from fastapi.responses import JSONResponse
from mangum import Mangum
from pydantic import BaseModel

app = FastAPI()


class Greeting(BaseModel):
    hello: str


@app.get("/")
def root() -> JSONResponse:
    return JSONResponse(Greeting(hello="world").model_dump(), media_type="application/json")


handler = Mangum(app, lifespan="off")
