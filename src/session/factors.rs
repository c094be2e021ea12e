//! How a session's user proved who they are: a set of RFC 8176 `amr` values, stored and sent
//! in apps' assertions as their space-separated names.

use std::fmt;

/// One way of proving who one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    /// A password.
    Pwd,
    /// A sign-in at an identity provider.
    Ext,
    /// A code from an authenticator app.
    Otp,
    /// A recovery code.
    Rc,
    /// A passkey or security key.
    Hwk,
    /// More than one factor, as an identity provider or a verifying passkey vouched.
    Mfa,
    /// A key held in software: an SSH key the person registered. One factor.
    Swk,
}

const ALL: [Factor; 7] = [Factor::Pwd, Factor::Ext, Factor::Otp, Factor::Rc, Factor::Hwk, Factor::Mfa, Factor::Swk];

impl Factor {
    pub fn amr(self) -> &'static str {
        match self {
            Factor::Pwd => "pwd",
            Factor::Ext => "ext",
            Factor::Otp => "otp",
            Factor::Rc => "rc",
            Factor::Hwk => "hwk",
            Factor::Mfa => "mfa",
            Factor::Swk => "swk",
        }
    }

    fn bit(self) -> u8 {
        1 << ALL.iter().position(|f| *f == self).unwrap_or(0)
    }
}

/// A set of factors, in the order of `Factor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Factors(u8);

impl Factors {
    /// An SSH key alone.
    pub const SWK: Factors = Factors(1 << 6);

    pub fn of(list: &[Factor]) -> Factors {
        Factors(list.iter().fold(0, |bits, f| bits | f.bit()))
    }

    /// The stored form; words it does not know are dropped.
    pub fn parse(s: &str) -> Factors {
        Factors::of(&s.split(' ').filter_map(|w| ALL.iter().copied().find(|f| f.amr() == w)).collect::<Vec<_>>())
    }

    pub fn with(self, f: Factor) -> Factors {
        Factors(self.0 | f.bit())
    }

    pub fn has(self, f: Factor) -> bool {
        self.0 & f.bit() != 0
    }

    /// More than one factor: anything but a password, a provider that did not vouch for more,
    /// or an SSH key (each of them one factor on its own).
    pub fn second_factor(self) -> bool {
        self.0 & !(Factor::Pwd.bit() | Factor::Ext.bit() | Factor::Swk.bit()) != 0
    }

    /// A second factor poort itself checked (not a provider's word).
    pub fn own_second_factor(self) -> bool {
        [Factor::Otp, Factor::Rc, Factor::Hwk].iter().any(|f| self.has(*f))
    }

    /// The `amr` values, for an assertion.
    pub fn amr(self) -> Vec<&'static str> {
        ALL.iter().filter(|f| self.has(**f)).map(|f| f.amr()).collect()
    }
}

impl fmt::Display for Factors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.amr().join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_form_reads_back_and_counts_factors() {
        for s in ["pwd", "ext", "ext mfa", "pwd otp", "pwd rc", "hwk mfa", "pwd otp hwk"] {
            assert_eq!(Factors::parse(s).to_string(), s);
        }
        assert!(!Factors::parse("pwd").second_factor());
        assert!(!Factors::parse("ext").second_factor());
        assert!(!Factors::parse("swk").second_factor(), "an SSH key is one factor");
        assert_eq!(Factors::SWK, Factors::of(&[Factor::Swk]));
        assert!(Factors::parse("ext mfa").second_factor());
        assert!(!Factors::parse("ext mfa").own_second_factor());
        assert!(Factors::parse("pwd rc").own_second_factor());
        assert_eq!(Factors::parse("pwd").with(Factor::Otp), Factors::parse("otp pwd"));
        assert_eq!(Factors::parse("pwd bogus"), Factors::of(&[Factor::Pwd]));
    }
}
