"""`prefcurate`, the command line: one module per command group (`add_parser(subparsers)` and `run(args)`),
cli/main.py builds the parser from them. Parsers import nothing heavy, so `prefcurate --help` stays fast; each
`run` imports the stage it calls (flows/stages.py, a Prefect flow, or a curation function)."""
