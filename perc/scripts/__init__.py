"""
The ``perc`` command and its subcommands (as ``twisted.scripts`` holds
``twistd`` and ``trial``): option parsing and wiring only, over the cores
and daemons in the rest of the package.
"""
