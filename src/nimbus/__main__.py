from nimbus.cli import main

main()
