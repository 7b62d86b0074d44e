"""One module per ``dvfl`` subcommand: ``add_arguments(parser)`` and ``run(args, parser) -> exit status``.

The entry-point layer: ``dvfl.cli`` builds ``dvfl COMMAND`` from these, and ``pipelines/*.py`` and
``tuning/search.py`` run them as scripts. Heavy imports (torch, Ray) stay inside ``run`` so that
``--help`` is quick.
"""
