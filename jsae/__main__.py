from jsae.cli import entry

entry()
