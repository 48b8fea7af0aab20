//! `/etc/passwd` and `/etc/group` parsing: pure functions over the text,
//! so the caller decides where the text comes from (the host's files for
//! the audit log, an image's files read without following its symlinks for
//! a container's user).
//!
//! Lines that are empty, comments, or malformed (too few fields, ids that
//! are not numbers) are skipped, as libc's parser skips them: one bad line
//! must not hide the good ones.

/// One line of `/etc/passwd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PasswdEntry<'a> {
    pub name: &'a str,
    pub uid: u32,
    pub gid: u32,
    pub home: &'a str,
    pub shell: &'a str,
}

/// One line of `/etc/group`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupEntry<'a> {
    pub name: &'a str,
    pub gid: u32,
    pub members: Vec<&'a str>,
}

/// The well-formed entries of a passwd file, in order.
pub fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    fields(text).filter_map(|f| {
        // name:password:uid:gid:gecos:home:shell
        let [name, _, uid, gid, ..] = f[..] else {
            return None;
        };
        Some(PasswdEntry {
            name,
            uid: uid.parse().ok()?,
            gid: gid.parse().ok()?,
            home: f.get(5).copied().unwrap_or(""),
            shell: f.get(6).copied().unwrap_or(""),
        })
    })
}

/// The well-formed entries of a group file, in order.
pub fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    fields(text).filter_map(|f| {
        // name:password:gid:member,member
        let [name, _, gid, ..] = f[..] else {
            return None;
        };
        let members = f
            .get(3)
            .map(|m| m.split(',').filter(|m| !m.is_empty()).collect())
            .unwrap_or_default();
        Some(GroupEntry {
            name,
            gid: gid.parse().ok()?,
            members,
        })
    })
}

fn fields(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| !f[0].is_empty())
}

/// The first user named `name`.
pub fn user_by_name<'a>(passwd: &'a str, name: &str) -> Option<PasswdEntry<'a>> {
    passwd_entries(passwd).find(|e| e.name == name)
}

/// The first user with `uid`.
pub fn user_by_uid(passwd: &str, uid: u32) -> Option<PasswdEntry<'_>> {
    passwd_entries(passwd).find(|e| e.uid == uid)
}

/// The first group named `name`.
pub fn group_by_name<'a>(group: &'a str, name: &str) -> Option<GroupEntry<'a>> {
    group_entries(group).find(|e| e.name == name)
}

/// The first group with `gid`.
pub fn group_by_gid(group: &str, gid: u32) -> Option<GroupEntry<'_>> {
    group_entries(group).find(|e| e.gid == gid)
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("user {0:?} is not in /etc/passwd")]
    UnknownUser(String),
    #[error("group {0:?} is not in /etc/group")]
    UnknownGroup(String),
}

/// Resolves an OCI/Docker `User` ("name", "uid", "uid:gid", "name:group",
/// "uid:group", "name:gid") to (uid, gid) against passwd and group text
/// (None: the file is missing, so only numbers resolve). Empty means root.
/// A name takes its primary group from passwd when no group is given; a
/// bare uid gets gid 0.
pub fn resolve_user(
    user: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<(u32, u32), UserError> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let (uid, primary_gid) = match u.parse::<u32>() {
        Ok(uid) => (uid, 0),
        Err(_) => passwd
            .and_then(|p| user_by_name(p, u))
            .map(|e| (e.uid, e.gid))
            .ok_or_else(|| UserError::UnknownUser(u.to_owned()))?,
    };
    let gid = match g {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group
                .and_then(|t| group_by_name(t, g))
                .map(|e| e.gid)
                .ok_or_else(|| UserError::UnknownGroup(g.to_owned()))?,
        },
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/bash
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin

broken:x:notanumber:1::/:/bin/sh
short:x:5
app:x:1000:1001:App,,,:/home/app:/bin/sh
twin:x:1000:7::/:/bin/sh
";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app,daemon\nbad:x:zz:\napp:x:1001:\n";

    #[test]
    fn passwd_lookups_skip_malformed_lines() {
        let app = user_by_name(PASSWD, "app").unwrap();
        assert_eq!(
            app,
            PasswdEntry {
                name: "app",
                uid: 1000,
                gid: 1001,
                home: "/home/app",
                shell: "/bin/sh"
            }
        );
        // The first of two entries with one uid wins.
        assert_eq!(user_by_uid(PASSWD, 1000).unwrap().name, "app");
        assert_eq!(user_by_uid(PASSWD, 0).unwrap().name, "root");
        assert_eq!(user_by_name(PASSWD, "broken"), None);
        assert_eq!(user_by_name(PASSWD, "short"), None);
        assert_eq!(user_by_name(PASSWD, "# a comment"), None);
        assert_eq!(user_by_uid(PASSWD, 4242), None);
        let names: Vec<_> = passwd_entries(PASSWD).map(|e| e.name).collect();
        assert_eq!(names, ["root", "daemon", "app", "twin"]);
    }

    #[test]
    fn group_lookups_list_members() {
        let staff = group_by_name(GROUP, "staff").unwrap();
        assert_eq!(staff.gid, 50);
        assert_eq!(staff.members, ["app", "daemon"]);
        assert!(group_by_gid(GROUP, 0).unwrap().members.is_empty());
        assert_eq!(group_by_name(GROUP, "bad"), None);
        assert_eq!(group_by_gid(GROUP, 1001).unwrap().name, "app");
    }

    #[test]
    fn user_specs_resolve_like_docker() {
        let (p, g) = (Some(PASSWD), Some(GROUP));
        assert_eq!(resolve_user("", p, g), Ok((0, 0)));
        assert_eq!(resolve_user("app", p, g), Ok((1000, 1001)));
        assert_eq!(resolve_user("app:staff", p, g), Ok((1000, 50)));
        assert_eq!(resolve_user("app:9", p, g), Ok((1000, 9)));
        assert_eq!(resolve_user("7", p, g), Ok((7, 0)));
        assert_eq!(resolve_user("7:8", None, None), Ok((7, 8)));
        assert_eq!(resolve_user("7:staff", p, g), Ok((7, 50)));
        assert_eq!(
            resolve_user("ghost", p, g),
            Err(UserError::UnknownUser("ghost".into()))
        );
        assert_eq!(
            resolve_user("app:nogroup", p, g).unwrap_err().to_string(),
            "group \"nogroup\" is not in /etc/group"
        );
        assert_eq!(
            resolve_user("app", None, g),
            Err(UserError::UnknownUser("app".into()))
        );
    }
}
