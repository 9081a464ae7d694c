from optcli.cli import main

main()
