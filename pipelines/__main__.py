from flywheel.pipelines.cli import main

main()
