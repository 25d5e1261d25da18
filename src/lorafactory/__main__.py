from lorafactory.cli import app

app()
