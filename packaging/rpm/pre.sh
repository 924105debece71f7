# mvps %pre: the mvps account must exist before the payload, whose environment files
# belong to group mvps (the sysusers.d file ships in the payload, so it cannot be used yet).
if ! getent group mvps >/dev/null; then
	groupadd --system mvps
fi
if ! getent passwd mvps >/dev/null; then
	useradd --system --gid mvps --home-dir /var/lib/mvps --no-create-home \
		--shell /sbin/nologin --comment "mvps block device server" mvps
fi
exit 0
