# Source on a lent GPU machine (device tool) before running ca2vdm there, from the repository root:
#   source bench/device_env.sh
# - Python packages the machine's image lacks travel as one archive, .dev/site.tar.xz (the unpacked cp312 wheels of
#   av, fastapi, starlette, pydantic(+core, settings), uvicorn, websockets, diffusers, ...; xz keeps it under the
#   tree-size limit), unpacked into /tmp/site;
# - the working tree is made importable as `ca2vdm` without installing it: /tmp/ns/ca2vdm links to ca2vdm/__init__.py
#   and to server/, kernels/, client/ (the same mapping pyproject.toml gives an installed wheel).
if [ -f .dev/site.tar.xz ] && [ ! -d /tmp/site ]; then
    tar xJf .dev/site.tar.xz -C /tmp
fi
rm -rf /tmp/ns && mkdir -p /tmp/ns/ca2vdm
ln -s "$PWD/ca2vdm/__init__.py" /tmp/ns/ca2vdm/__init__.py
for d in server kernels client; do ln -s "$PWD/$d" "/tmp/ns/ca2vdm/$d"; done
export PYTHONPATH="/tmp/ns:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import ca2vdm.server.engine.engine, torch; print('ca2vdm from', ca2vdm.__file__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
