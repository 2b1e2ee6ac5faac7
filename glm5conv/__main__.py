from glm5conv.cli import run

run()
