# Source on a lent GPU machine (device tool) before running ca2vdm there, from the repository root:
#   source bench/device_env.sh
# - Python packages the machine's image lacks travel as one archive, .dev/site.tar.xz (the unpacked cp312 wheels of
#   av, fastapi, starlette, pydantic(+core, settings), uvicorn, websockets, diffusers, ...; xz keeps it under the
#   tree-size limit), unpacked into /tmp/site;
# - the working tree is made importable as `ca2vdm` without installing it: links ca2vdm/server, ca2vdm/kernels and
#   ca2vdm/client to the top-level folders (the mapping pyproject.toml gives an installed wheel), made on that
#   machine's copy of the tree only.
if [ -f .dev/site.tar.xz ] && [ ! -d /tmp/site ]; then
    tar xJf .dev/site.tar.xz -C /tmp
fi
for d in server kernels client; do ln -sfn "../$d" "ca2vdm/$d"; done
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import ca2vdm.server.engine.engine, torch; print('ca2vdm from', ca2vdm.__file__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
