from healthcheck.rules.registry import all_docs

print(all_docs(), end="")
